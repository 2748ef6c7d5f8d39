"""The one module that talks to Postgres.

Statements live in sql/queries.sql and sql/migrations/ and are used by name. Driver errors are
translated here, at the boundary, into the service's own hierarchy (errors.py), so callers decide
by meaning: retry later (DatabaseError), retry now (ConflictError), or the data itself was
refused (ContentRejected).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from io import BytesIO
from typing import Any, Iterator

import psycopg2
import psycopg2.extras
from psycopg2 import sql as pgsql

from .errors import ConflictError, ContentRejected, DatabaseError, QueryCanceled, SchemaError
from .text import one_line

log = logging.getLogger(__name__)

_BLOCK_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Named blocks of a .sql file: `-- name --`, then optional `--` comment lines, then the SQL."""
    parts = _BLOCK_HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        statement = "\n".join(line for line in body.strip().splitlines() if not line.startswith("--")).strip()
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = statement.rstrip(";")
    return queries


QUERIES = parse_queries(resources.files("reconciler.sql").joinpath("queries.sql").read_text("utf-8"))

# Statements run for every batch: prepared once per connection, so Postgres parses and plans them
# once instead of on every call (planning was a visible share of a batch: docs/benchmarks.md).
PREPARED = frozenset({"claim_receipts", "lock_heads", "mark_duplicates", "claim_batch", "finish_rows",
                      "allocate_change_set_ids", "keep_latest_change_sets"})

_PARAMETER = re.compile(r"%\((\w+)\)s((?:::[\w\[\] ]+?(?=[\s,)]|$))?)")


@dataclass(frozen=True)
class Prepared:
    """A named query in PREPARE form ($1, $2...) and the EXECUTE that passes its parameters."""

    prepare: str
    execute: str


def prepared_form(name: str, sql: str) -> Prepared:
    order: dict[str, str] = {}  # parameter -> the cast written after its first use, if any

    def positional(match: re.Match) -> str:
        order.setdefault(match[1], match[2])
        return f"${list(order).index(match[1]) + 1}{match[2]}"

    body = _PARAMETER.sub(positional, sql)
    arguments = ", ".join(f"%({param})s{cast}" for param, cast in order.items())
    return Prepared(f"PREPARE {name} AS {body}", f"EXECUTE {name}({arguments})" if order else f"EXECUTE {name}")


PREPARED_FORMS = {name: prepared_form(name, QUERIES[name]) for name in PREPARED}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("reconciler.sql.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    return migrations()[-1].version


# --- error translation ---

_CONFLICT_CODES = {"23505", "40001", "40P01"}  # unique violation, serialization failure, deadlock
_CONTENT_CLASSES = {"22", "23"}  # data exception, integrity constraint violation
_CONTENT_CODES = {"54000"}  # program limit exceeded (e.g. an index row too large)
_CANCELED_CODE = "57014"  # query_canceled: statement_timeout, or pg_cancel_backend


def _first_lines(exc: psycopg2.Error) -> str:
    return one_line(exc.pgerror or str(exc) or type(exc).__name__, max_lines=3)


def translate(exc: psycopg2.Error) -> DatabaseError:
    code = exc.pgcode
    detail = _first_lines(exc)
    if code in _CONFLICT_CODES:
        return ConflictError(detail)
    if code == _CANCELED_CODE:
        return QueryCanceled(detail)
    if code and (code[:2] in _CONTENT_CLASSES or code in _CONTENT_CODES):
        return ContentRejected(detail)
    return DatabaseError(detail)


class Tx:
    """One open transaction: run named statements on its cursor."""

    def __init__(self, cursor, prepared: set[str]) -> None:
        self.cursor, self._prepared = cursor, prepared

    def execute(self, name: str, params: dict[str, Any] | None = None) -> None:
        form = PREPARED_FORMS.get(name)
        if form is None:
            self.cursor.execute(QUERIES[name], params)
            return
        if name not in self._prepared:
            self.cursor.execute(form.prepare)  # prepared statements outlive rollbacks: once per connection
            self._prepared.add(name)
        self.cursor.execute(form.execute, params)

    def fetchall(self, name: str, params: dict[str, Any] | None = None) -> list[tuple]:
        self.execute(name, params)
        return self.cursor.fetchall()

    def execute_values(self, name: str, rows: list[tuple]) -> None:
        psycopg2.extras.execute_values(self.cursor, QUERIES[name], rows, page_size=500)

    def copy(self, name: str, payload: bytes) -> None:
        self.cursor.copy_expert(QUERIES[name], BytesIO(payload), size=len(payload) or 1)  # one chunk

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Undo only the statements inside when Postgres refuses their content."""
        self.execute("savepoint")
        try:
            yield
        except psycopg2.Error as exc:
            self.execute("rollback_to_savepoint")
            self.execute("release_savepoint")
            raise translate(exc) from exc
        self.execute("release_savepoint")

    def probe_copy(self, name: str, payload: bytes) -> None:
        """COPY and always undo it: raises ContentRejected if Postgres would refuse the tuples."""
        with self.savepoint():
            self.copy(name, payload)
            self.execute("rollback_to_savepoint")


class Database:
    """A lazily opened connection owned by one process (reopened after fork or after a failure)."""

    def __init__(self, dsn: str, schema: str, application_name: str = "reconciler", connect_timeout: int = 10,
                 statement_timeout_ms: int = 0) -> None:
        self.dsn, self.schema, self.application_name = dsn, schema, application_name
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms  # 0: none (a probe wants one, the roles do not)
        self._conn: Any = None  # a psycopg2 connection (psycopg2 is untyped)
        self._pid: int | None = None
        self._prepared: set[str] = set()

    def connect(self):
        if self._conn is not None and not self._conn.closed and self._pid == os.getpid():
            return self._conn
        # A connection inherited across fork belongs to the parent: never reuse or close it here.
        self._conn, self._pid = None, None
        try:
            conn = psycopg2.connect(self.dsn, application_name=self.application_name,
                                    options=f"-c search_path={self.schema} "
                                            f"-c statement_timeout={self.statement_timeout_ms}",
                                    connect_timeout=self.connect_timeout,
                                    keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                                    # A write to a server that vanished (host down, not restarted) fails
                                    # after 60 s instead of the kernel's ~15 min of retransmits.
                                    tcp_user_timeout=60_000)
        except psycopg2.Error as exc:
            raise DatabaseError(f"cannot connect to Postgres: {_first_lines(exc)}") from exc
        self._conn, self._pid, self._prepared = conn, os.getpid(), set()
        return conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn, self._pid = None, None

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A transaction committed on success and rolled back on any error (translated)."""
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                yield Tx(cursor, self._prepared)
            conn.commit()
        except BaseException as exc:
            self._rollback_quietly()
            if isinstance(exc, psycopg2.Error):
                raise translate(exc) from exc
            raise

    def _rollback_quietly(self) -> None:
        try:
            self._conn.rollback()
        except psycopg2.Error:
            pass  # the connection is gone; the server rolled back for us
        if self._conn.closed:
            self.close()

    def fetchall(self, name: str, params: dict[str, Any] | None = None) -> list[tuple]:
        with self.transaction() as tx:
            return tx.fetchall(name, params)

    def vacuum_queue_table(self) -> None:
        """VACUUM ingestion_logs (it cannot run inside a transaction block)."""
        try:
            self._outside_transaction("vacuum_queue_table")
        except psycopg2.Error as exc:
            self._rollback_quietly()
            raise translate(exc) from exc

    def _outside_transaction(self, name: str, params: dict | None = None) -> None:
        """Run one statement in autocommit (session-level locks, VACUUM), then return the connection
        to transactions; raises psycopg2 errors for the caller to translate."""
        conn = self.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(QUERIES[name], params)
        finally:
            if not conn.closed:
                conn.autocommit = False

    # --- schema ---

    def schema_version(self) -> int:
        with self.transaction() as tx:
            if not tx.fetchall("migrations_table_exists")[0][0]:
                return 0
            return max((row[0] for row in tx.fetchall("applied_migrations")), default=0)

    def check_schema(self) -> None:
        current, wanted = self.schema_version(), latest_version()
        if current != wanted:
            raise SchemaError(f"schema {self.schema!r} is at version {current}, this reconciler needs "
                              f"{wanted}: run `reconciler migrate`")

    def migrate(self) -> list[Migration]:
        """Apply pending migrations, each in its own transaction; returns what was applied."""
        key = {"key": f"reconciler.migrate.{self.schema}"}
        try:
            self._outside_transaction("migrate_lock", key)
            try:
                return self._apply_pending()
            finally:
                self._outside_transaction("migrate_unlock", key)
        except psycopg2.Error as exc:
            self._rollback_quietly()
            raise translate(exc) from exc

    def _apply_pending(self) -> list[Migration]:
        with self.transaction() as tx:
            tx.cursor.execute(pgsql.SQL(QUERIES["create_schema"]).format(schema=pgsql.Identifier(self.schema)))
            tx.execute("create_migrations_table")
            applied = {row[0]: row[2] for row in tx.fetchall("applied_migrations")}
        done = []
        for migration in migrations():
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise SchemaError(f"migration {migration.version:04d}_{migration.name} was changed "
                                      f"after it was applied; migrations must never be edited")
                continue
            with self.transaction() as tx:
                tx.cursor.execute(migration.sql)
                tx.execute("record_migration", {"version": migration.version, "name": migration.name,
                                                "checksum": migration.checksum})
            log.info("applied migration %04d_%s", migration.version, migration.name)
            done.append(migration)
        return done
