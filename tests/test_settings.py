"""The settings registry, its layers, `check-config`/`print-config`, and the files derived from it."""

from __future__ import annotations

import pytest

from reconciler import cli, errors, settings
from reconciler.errors import ConfigError

from .support import ROOT


def write_ini(tmp_path, text: str) -> str:
    path = tmp_path / "reconciler.ini"
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file():
    config = settings.load(path=None, environ={})
    assert config.redis.stream == "diode.v1.ingest-stream"
    assert config.redis.group == "diode-reconciler"
    assert (config.workers.count, config.workers.batch_size, config.workers.auto_apply) == (2, 100, True)
    assert config.path is None and set(config.sources.values()) == {"default"}


def test_layers_default_then_ini_then_env_then_cli(tmp_path):
    path = write_ini(tmp_path, "[workers]\ncount = 3\nbatch_size = 50\n[redis]\ngroup = from-ini\n")
    config = settings.load(path, {"RECONCILER_WORKERS_COUNT": "5", "RECONCILER_REDIS_STREAM": "s-env"},
                           {"workers.count": "7"})
    assert config.workers.count == 7 and config.sources["workers.count"] == "command line --workers"
    assert config.workers.batch_size == 50 and config.sources["workers.batch_size"].endswith("[workers] batch_size")
    assert config.redis.group == "from-ini"
    assert config.redis.stream == "s-env" and config.sources["redis.stream"] == "environment RECONCILER_REDIS_STREAM"


def test_credential_files_win_over_the_ini_file_and_lose_to_the_environment(tmp_path):
    """systemd's LoadCredential= puts secrets in $CREDENTIALS_DIRECTORY, named like the env variable."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "RECONCILER_NETBOX_TOKEN").write_text("from-credential\n")
    (credentials / "RECONCILER_POSTGRES_DSN").write_text("postgresql://app:s3cret@db/reconciler")
    path = write_ini(tmp_path, "[netbox]\ntoken = from-ini\n[postgres]\ndsn = postgresql://ini@db/x\n")
    config = settings.load(path, {"CREDENTIALS_DIRECTORY": str(credentials),
                                  "RECONCILER_POSTGRES_DSN": "postgresql://env@db/y"})
    assert config.netbox.token == "from-credential"
    assert config.sources["netbox.token"] == f"credential {credentials}/RECONCILER_NETBOX_TOKEN"
    assert config.postgres.dsn == "postgresql://env@db/y"


def test_every_setting_has_an_env_name_of_its_section_and_key():
    assert settings.BY_NAME["postgres.dsn"].env == "RECONCILER_POSTGRES_DSN"
    assert all(s.env == f"RECONCILER_{s.section}_{s.key}".upper() for s in settings.SETTINGS)
    required = {"redis.url", "redis.stream", "redis.group", "postgres.dsn", "workers.count", "workers.batch_size",
                "workers.auto_apply", "netbox.url", "netbox.token_url", "netbox.client_id",
                "netbox.client_secret_file", "netbox.token"}
    assert required <= set(settings.BY_NAME)


@pytest.mark.parametrize("text, message", [
    ("[workers]\ncount = many\n", "[workers] count: invalid literal"),
    ("[workers]\ncount = -1\n", "[workers] count: must be >= 0"),
    ("[workers]\nauto_apply = maybe\n", "[workers] auto_apply: expected true or false"),
    ("[workers]\ncuont = 2\n",
     "unknown setting [workers] cuont (known keys in [workers]: count, batch_size, auto_apply, "),
    ("[worker]\ncount = 2\n", "unknown setting [worker] count (no section [worker])"),
    ("[redis]\nurl = http://x\n", "[redis] url: expected a URL starting with redis://"),
    ("[postgres]\nschema = Robert'); DROP\n", "[postgres] schema: expected a lower-case SQL identifier"),
    ("[log]\nlevel = loud\n", "[log] level: must be one of debug, info, warning, error"),
    ("count = 1\n", "not valid INI"),
], ids=["not-int", "negative", "not-bool", "typo-key", "typo-section", "bad-url", "bad-schema", "bad-choice",
        "no-section"])
def test_bad_ini_names_the_file_and_key(tmp_path, text, message):
    path = write_ini(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        settings.load(path, {})
    assert message in str(caught.value) and path in str(caught.value)


def test_bad_env_and_unknown_env_are_named():
    with pytest.raises(ConfigError,
                       match="environment RECONCILER_WORKERS_BATCH_SIZE: must be between 1 and 10000, got 0"):
        settings.load(None, {"RECONCILER_WORKERS_BATCH_SIZE": "0"})
    with pytest.raises(ConfigError, match="unknown environment variable RECONCILER_WORKER_COUNT"):
        settings.load(None, {"RECONCILER_WORKER_COUNT": "2"})


TOKEN = {"RECONCILER_NETBOX_TOKEN": "t"}
OAUTH = {"RECONCILER_NETBOX_TOKEN_URL": "https://auth/token", "RECONCILER_NETBOX_CLIENT_ID": "c",
         "RECONCILER_NETBOX_CLIENT_SECRET": "s"}


@pytest.mark.parametrize("environ, refusal", [
    # The longest plugin call, with every retry, must end before the lease does.
    ({**TOKEN, "RECONCILER_WORKERS_LEASE_SECONDS": "100"}, r"lease_seconds \(100\) must exceed .* \(240\)"),
    # The lease, less the time kept to record the outcome, must hold one request ...
    ({**TOKEN, "RECONCILER_NETBOX_MAX_ATTEMPTS": "1", "RECONCILER_WORKERS_LEASE_SECONDS": "61"},
     r"lease_seconds \(61\) leaves 54.9 s .* one request \(65 s\)"),
    # ... two with OAuth, when a token request comes first.
    ({**OAUTH, "RECONCILER_WORKERS_LEASE_SECONDS": "140", "RECONCILER_NETBOX_MAX_ATTEMPTS": "2"},
     r"not enough for a token request and one request \(130 s\)"),
    # A worker waiting for one plugin request must not be taken for a hung one.
    ({**TOKEN, "RECONCILER_NETBOX_TIMEOUT_SECONDS": "50", "RECONCILER_SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "55"},
     r"heartbeat_timeout_seconds \(55\) must exceed one plugin request .* 55 s"),
], ids=["retries-outlast-lease", "no-time-for-one-request", "no-time-for-token-and-request", "heartbeat-too-short"])
def test_time_limits_that_cannot_work_together_are_refused(environ, refusal):
    with pytest.raises(ConfigError, match=refusal):
        settings.check_runnable(settings.load(None, environ))


def test_a_short_heartbeat_is_fine_without_workers():
    settings.check_runnable(settings.load(None, {**TOKEN, "RECONCILER_WORKERS_COUNT": "0",
                                                "RECONCILER_SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "5"}))


def test_a_drain_shorter_than_a_plugin_request_is_a_warning(tmp_path, capsys):
    assert settings.advisories(settings.load(None, {})) == []  # the defaults fit together
    short = write_ini(tmp_path, "[netbox]\ntoken = t\n[supervisor]\ndrain_seconds = 30\n")
    assert cli.main(["check-config", "-c", short]) == 0
    err = capsys.readouterr().err
    assert "warning: [supervisor] drain_seconds (30) is shorter than one plugin request (65 s)" in err
    assert cli.main(["check-config", "-c", short, "-w", "0"]) == 0 and capsys.readouterr().err == ""


def test_cross_setting_rules(tmp_path):
    with pytest.raises(ConfigError, match="client_id: required when"):
        settings.load(None, {"RECONCILER_NETBOX_TOKEN_URL": "https://auth/token"})
    with pytest.raises(ConfigError, match="client_secret_file: cannot read"):
        settings.load(None, {"RECONCILER_NETBOX_CLIENT_SECRET_FILE": str(tmp_path / "missing")})


def test_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        settings.load(str(tmp_path / "nope.ini"), {})
    with pytest.raises(ConfigError, match="cannot read config file"):
        settings.load(None, {"RECONCILER_CONFIG": str(tmp_path / "nope.ini")})


def test_check_config_exits_zero_or_one(tmp_path, capsys):
    good = write_ini(tmp_path, "[workers]\ncount = 4\n[netbox]\ntoken = t0ken\n")
    assert cli.main(["check-config", "-c", good]) == 0
    assert "configuration OK" in capsys.readouterr().out
    no_token = write_ini(tmp_path, "[workers]\ncount = 4\n")
    assert cli.main(["check-config", "-c", no_token]) == 1
    assert "[netbox] token or [netbox] token_url is required" in capsys.readouterr().err
    assert cli.main(["check-config", "-c", no_token, "-w", "0"]) == 0  # the consumer alone needs no plugin
    bad = write_ini(tmp_path, "[workers]\ncount = four\n")
    assert cli.main(["check-config", "-c", bad]) == 1
    assert "[workers] count" in capsys.readouterr().err
    assert cli.main(["run", "-c", bad]) == errors.RET_CONFIG


def test_flags_override_concurrency_and_batch_sizes(tmp_path, capsys):
    path = write_ini(tmp_path, "[workers]\ncount = 4\n")
    assert cli.main(["print-config", "-c", path, "-w", "0", "--batch-size", "25", "--read-count", "3"]) == 0
    out = capsys.readouterr().out
    assert "count = 0" in out and "batch_size = 25" in out and "read_count = 3" in out
    assert cli.main(["check-config", "-c", path, "--workers", "x"]) == 1


def test_print_config_masks_secrets(tmp_path, capsys, monkeypatch):
    path = write_ini(tmp_path, "[netbox]\ntoken = s3cret-token\n[postgres]\ndsn = postgresql://rec:pa55@db/rec\n"
                               "[redis]\nurl = redis://user:hunter2@127.0.0.1:6379/1\n")
    assert cli.main(["print-config", "-c", path]) == 0
    out = capsys.readouterr().out
    assert "s3cret-token" not in out and "pa55" not in out and "hunter2" not in out
    assert "token = ****" in out and "postgresql://rec:****@db/rec" in out and "redis://user:****@127.0.0.1" in out
    assert settings.mask_dsn_password("host=db password='p w' user=x") == "host=db password=**** user=x"


def test_etc_reconciler_ini_lists_every_setting_with_its_default():
    assert (ROOT / "etc" / "reconciler.ini").read_text() == settings.render_ini(), \
        "etc/reconciler.ini is stale: regenerate it with `reconciler print-config --defaults`"
    assert settings.load(str(ROOT / "etc" / "reconciler.ini"), {}).sources == \
        {s.name: "default" for s in settings.SETTINGS}


def test_readme_configuration_table_is_generated_from_the_registry():
    assert settings.render_markdown_table() in (ROOT / "README.md").read_text(), \
        "README.md's configuration table is stale: regenerate it with `reconciler print-config --markdown`"
