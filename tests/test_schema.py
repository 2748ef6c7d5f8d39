"""Migrations and the named SQL statements."""

from __future__ import annotations

import hashlib
import threading

import psycopg2
import pytest

from reconciler import db as dbmod, states
from reconciler.db import Database, parse_queries
from reconciler.errors import SchemaError

from .support import query, scalar


def test_query_file_parser():
    text = "-- one --\n-- what it does\nSELECT 1;\n\n-- two --\nSELECT %(x)s\nFROM t;\n"
    assert parse_queries(text) == {"one": "SELECT 1", "two": "SELECT %(x)s\nFROM t"}
    with pytest.raises(ValueError, match="defined twice"):
        parse_queries("-- a --\nSELECT 1;\n-- a --\nSELECT 2;\n")


def test_every_query_is_used_by_the_code():
    from pathlib import Path
    code = "".join(p.read_text() for p in Path(dbmod.__file__).parent.rglob("*.py"))
    unused = [name for name in dbmod.QUERIES if f'"{name}"' not in code]
    assert unused == []


def test_every_state_in_the_queries_is_written_with_its_name():
    """diode.v1.State makes states integers; a reader of the SQL still sees which: `9 /* PENDING_RETRY */`."""
    import re
    unnamed = []
    for name, sql in dbmod.QUERIES.items():
        for line in sql.splitlines():
            compared = re.findall(r"state\s*(?:=|(?:NOT\s+)?IN\s*\((?:\d+ /\* \w+ \*/, )*)\s*(\d+)\b(?!\s*/\*)", line)
            assigned = re.findall(r"(?:THEN|ELSE)\s+(\d+)\b(?!\s*/\*)", line) \
                if re.match(r"\s*(SET )?(requeued_from_)?state\s*=", line) else []
            unnamed += [(name, number) for number in compared + assigned]
    assert unnamed == []
    named = re.findall(r"(\d+) /\* (\w+) \*/", "".join(dbmod.QUERIES.values()))
    assert named and all(states.NAMES[int(number)] == label for number, label in named)


@pytest.mark.pg
def test_migrate_is_idempotent_and_safe_when_replicas_start_together(empty_dsn):
    results, failures = [], []

    def migrate():
        database = Database(empty_dsn, "reconciler")
        try:
            results.append(len(database.migrate()))
        except Exception as exc:  # noqa: BLE001 - the test reports any failure below
            failures.append(exc)
        finally:
            database.close()

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sorted(results) == [0, 0, 0, len(dbmod.migrations())]
    database = Database(empty_dsn, "reconciler")
    assert database.migrate() == []
    database.check_schema()
    database.close()


@pytest.mark.pg
def test_unmigrated_schema_is_reported_with_the_fix(empty_dsn):
    database = Database(empty_dsn, "reconciler")
    with pytest.raises(SchemaError, match=r"at version 0, this reconciler needs \d+: run `reconciler migrate`"):
        database.check_schema()
    database.close()


@pytest.mark.pg
def test_an_edited_migration_is_refused(dsn):
    query(dsn, "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    database = Database(dsn, "reconciler")
    with pytest.raises(SchemaError, match="was changed after it was applied"):
        database.migrate()
    database.close()


@pytest.mark.pg
def test_tables_live_in_their_own_schema_beside_the_go_reconcilers(empty_dsn):
    conn = psycopg2.connect(empty_dsn)
    with conn, conn.cursor() as cursor:  # the Go reconciler's table of the same name, in public
        cursor.execute("CREATE TABLE public.ingestion_logs (id integer, entity jsonb)")
    conn.close()
    database = Database(empty_dsn, "reconciler")
    database.migrate()
    database.close()
    assert scalar(empty_dsn, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'ingestion_logs'") == 2


@pytest.mark.pg
def test_queue_table_vacuums_early(dsn):
    options = scalar(dsn, "SELECT reloptions FROM pg_class WHERE oid = 'ingestion_logs'::regclass")
    assert "autovacuum_vacuum_scale_factor=0.01" in options


@pytest.mark.pg
def test_head_lookup_uses_the_head_index(dsn):
    query(dsn, "INSERT INTO ingestion_logs (object_type, request_id, ingestion_ts, producer_app_name, "
               "producer_app_version, sdk_name, sdk_version, entity, entity_hash) "
               "SELECT 'dcim.site', 'r', 0, 'p', 'v', 's', 'v', '\\x00', sha256(i::text::bytea) "
               "FROM generate_series(1, 5000) i")
    query(dsn, "ANALYZE ingestion_logs")
    plan = "\n".join(row[0] for row in query(dsn, "EXPLAIN " + dbmod.QUERIES["lock_heads"], {
        "hashes": b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(1000))}))
    assert "Index Scan using ingestion_logs_head_hash" in plan and "Seq Scan" not in plan


@pytest.mark.pg
def test_deleting_a_row_deletes_its_change_sets_and_changes(dsn):
    query(dsn, "INSERT INTO ingestion_logs (object_type, request_id, ingestion_ts, producer_app_name, "
               "producer_app_version, sdk_name, sdk_version, entity, entity_hash) "
               "SELECT 'dcim.site', 'r', 0, 'p', 'v', 's', 'v', '\\x00', sha256(i::text::bytea) "
               "FROM generate_series(1, 2) i")
    query(dsn, "INSERT INTO change_sets (external_id, ingestion_log_id, deviation_name) "
               "VALUES ('a', 1, 'x'), ('b', 2, 'y')")
    query(dsn, "INSERT INTO changes (external_id, change_set_id, change_type, object_type, sequence_number) "
               "VALUES ('c1', 1, 'create', 'dcim.site', 0), ('c2', 1, 'noop', 'dcim.site', 1), "
               "('c3', 2, 'create', 'dcim.site', 0)")
    query(dsn, "DELETE FROM ingestion_logs WHERE id = 1")
    assert query(dsn, "SELECT ingestion_log_id FROM change_sets") == [(2,)]
    assert query(dsn, "SELECT external_id FROM changes") == [("c3",)]


@pytest.mark.pg
def test_truncating_the_inbox_empties_change_sets_and_changes(dsn):
    query(dsn, "INSERT INTO ingestion_logs (object_type, request_id, ingestion_ts, producer_app_name, "
               "producer_app_version, sdk_name, sdk_version, entity, entity_hash) "
               "VALUES ('dcim.site', 'r', 0, 'p', 'v', 's', 'v', '\\x00', sha256('1'))")
    query(dsn, "INSERT INTO change_sets (external_id, ingestion_log_id, deviation_name) VALUES ('a', 1, 'x')")
    query(dsn, "INSERT INTO changes (external_id, change_set_id, change_type, object_type, sequence_number) "
               "SELECT 'c1', id, 'create', 'dcim.site', 0 FROM change_sets")
    query(dsn, "TRUNCATE ingestion_logs CASCADE")
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == 0
    assert scalar(dsn, "SELECT count(*) FROM changes") == 0
    query(dsn, "INSERT INTO change_sets (external_id, ingestion_log_id, deviation_name) VALUES ('b', 1, 'y')")
    query(dsn, "INSERT INTO changes (external_id, change_set_id, change_type, object_type, sequence_number) "
               "SELECT 'c2', id, 'create', 'dcim.site', 0 FROM change_sets")
    query(dsn, "TRUNCATE change_sets")
    assert scalar(dsn, "SELECT count(*) FROM changes") == 0
    query(dsn, "INSERT INTO change_sets (external_id, ingestion_log_id, deviation_name) VALUES ('c', 1, 'z')")
    query(dsn, "TRUNCATE ingestion_logs, change_sets, changes CASCADE")  # naming them all is fine too
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == 0
