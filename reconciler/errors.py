"""Exit codes (a contract with systemd) and the one exception hierarchy of the service."""

# Exit codes. systemd's Restart=on-failure restarts on any non-zero code; the unit file keeps
# RET_CONFIG out of restarts (RestartPreventExitStatus), since a bad file does not heal itself.
RET_OK = 0  # clean stop: every child drained in time
RET_KILLED = 1  # abnormal stop: a child had to be killed, or died by a signal we did not send
RET_CONFIG = 2  # the configuration is invalid (or check-config found a problem)
RET_BOOT = 3  # a child kept failing while booting (cannot connect, schema not migrated, ...)
RET_CONNECT = 4  # the supervisor could not reach Postgres to migrate at start-up
RET_CRASHLOOP = 5  # a booted child kept crashing; restarting it again would only spin

EXIT_CODES = {
    RET_OK: "clean stop",
    RET_KILLED: "abnormal stop (a child was killed or drain time ran out)",
    RET_CONFIG: "invalid configuration",
    RET_BOOT: "a child failed at boot repeatedly",
    RET_CONNECT: "cannot connect to a required service at start-up",
    RET_CRASHLOOP: "a child crashed repeatedly after booting",
}


class ReconcilerError(Exception):
    """Base of every error the service raises on purpose."""


class ConfigError(ReconcilerError):
    """A setting is missing, malformed or unknown; the message names the key."""


class BootError(ReconcilerError):
    """A process role could not start (its dependencies are unreachable or unfit)."""


class DatabaseError(ReconcilerError):
    """Postgres failed for a reason that retrying later may fix (connection, restart, disk)."""


class QueryCanceled(DatabaseError):
    """A statement ran past its statement_timeout (or was cancelled); the same statement will again."""


class ConflictError(DatabaseError):
    """A concurrent transaction got there first (unique key, deadlock); retry at once."""


class ContentRejected(DatabaseError):
    """Postgres refused the data itself (NUL in text, value out of range); retrying cannot help."""


class SchemaError(ReconcilerError):
    """The database schema is not the one this version expects (run `reconciler migrate`)."""
