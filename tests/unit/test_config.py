"""Settings: environment over runner.toml, validation with one line naming the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from codex_runner.config import load_settings
from codex_runner.errors import ConfigError


def test_defaults(tmp_path: Path) -> None:
    s = load_settings({}, cwd=tmp_path)
    assert s.data_dir == tmp_path / ".runner-data"
    assert s.database_url == f"sqlite:///{tmp_path / '.runner-data' / 'runner.db'}"
    assert s.log_dir == s.data_dir / "logs" and s.workspace_dir == s.data_dir / "workspaces"
    assert (s.host, s.port, s.max_concurrency, s.max_jobs_per_user) == ("127.0.0.1", 8787, 2, 3)
    assert (s.max_queue_size, s.max_queued_per_user, s.log_max_bytes) == (200, 20, 67108864)
    assert s.enabled and s.cleanup_after_job and not s.production
    assert s.id


def test_environment_wins_over_toml(tmp_path: Path) -> None:
    (tmp_path / "runner.toml").write_text("[runner]\nmax_concurrency = 4\nport = 9000\n")
    s = load_settings({"RUNNER_MAX_CONCURRENCY": "7"}, cwd=tmp_path)
    assert s.max_concurrency == 7 and s.port == 9000
    assert s.worker_metrics_port == 0  # off unless set
    assert s.config == (tmp_path / "runner.toml").resolve()


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        # The common spelling of other tools is refused; the line gives the one that works.
        ({"RUNNER_DATABASE_URL": "postgres://bob:pw@127.0.0.1/test"}, ["write postgresql://"]),
        ({"RUNNER_DATABASE_URL": "postgresql://bob:pw@127.0.0.1:abc/test"}, ["port", "number"]),
        ({"RUNNER_ENCRYPTION_KEY": "short"}, ["codex-runner keygen"]),
        ({"RUNNER_ENCRYPTION_KEY_PREVIOUS": "garbage"}, ["the key before the rotation"]),
    ],
)
def test_bad_values_say_what_to_do(tmp_path: Path, env: dict[str, str], fragments: list[str]) -> None:
    """An operator's usual mistakes got a line naming the setting but not the fix: `postgres://`
    (what Heroku, psql and many tools write), a port that is not a number, a key not made by
    `keygen`."""
    with pytest.raises(ConfigError) as exc:
        load_settings(env, cwd=tmp_path)
    for fragment in fragments:
        assert fragment in exc.value.message, exc.value.message
    assert "pw" not in exc.value.message and "short" not in exc.value.message


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"RUNNER_MAX_CONCURRENCY": "0"}, "RUNNER_MAX_CONCURRENCY: must be at least 1"),
        ({"RUNNER_PORT": "http"}, "RUNNER_PORT: expected an integer"),
        ({"RUNNER_PORT": "70000"}, "RUNNER_PORT: must be at most 65535"),
        ({"RUNNER_WORKER_METRICS_PORT": "70000"}, "RUNNER_WORKER_METRICS_PORT: must be at most 65535"),
        ({"RUNNER_WORKER_METRICS_PORT": "-1"}, "RUNNER_WORKER_METRICS_PORT: must be at least 0"),
        ({"RUNNER_MAX_STREAMS_PER_USER": "0"}, "RUNNER_MAX_STREAMS_PER_USER: must be at least 1"),
        ({"RUNNER_ENABLED": "maybe"}, "RUNNER_ENABLED: expected true or false"),
        ({"RUNNER_LOG_FORMAT": "xml"}, "RUNNER_LOG_FORMAT"),
        ({"RUNNER_DATABASE_URL": "mysql://x"}, "RUNNER_DATABASE_URL"),
        ({"RUNNER_ENCRYPTION_KEY": "short"}, "RUNNER_ENCRYPTION_KEY"),
        ({"RUNNER_ENCRYPTION_KEY_PREVIOUS": "garbage"}, "RUNNER_ENCRYPTION_KEY_PREVIOUS: expected 64 hex"),
        (
            {"RUNNER_DATABASE_URL": "postgresql://bob:pw@127.0.0.1:abc/test"},
            "RUNNER_DATABASE_URL: not a valid",
        ),
        (
            {"RUNNER_DATABASE_URL": "postgresql://bob:pw@127.0.0.1:99999/test"},
            "RUNNER_DATABASE_URL: the port",
        ),
        ({"RUNNER_DATABASE_URL": "postgresql://bob:Pa@ss#Word99@127.0.0.1/test"}, "percent-encode"),
        ({"RUNNER_ALLOWED_REPO_PATHS": "[1, 2]"}, "RUNNER_ALLOWED_REPO_PATHS"),
        (
            {"RUNNER_STALE_AFTER_SECONDS": "10", "RUNNER_HEARTBEAT_SECONDS": "30"},
            "RUNNER_STALE_AFTER_SECONDS",
        ),
        ({"RUNNER_CONFIG": "missing.toml"}, "RUNNER_CONFIG: file"),
        # Numbers out of range (nan, inf, too large for date arithmetic) stop start-up too.
        (
            {"RUNNER_POLL_INTERVAL_SECONDS": "nan"},
            "RUNNER_POLL_INTERVAL_SECONDS: must be a finite number greater than 0",
        ),
        ({"RUNNER_POLL_INTERVAL_SECONDS": "inf"}, "RUNNER_POLL_INTERVAL_SECONDS: must be a finite"),
        ({"RUNNER_POLL_INTERVAL_SECONDS": "-1"}, "RUNNER_POLL_INTERVAL_SECONDS: must be a finite"),
        ({"RUNNER_POLL_INTERVAL_SECONDS": "0"}, "RUNNER_POLL_INTERVAL_SECONDS: must be a finite"),
        ({"RUNNER_POLL_INTERVAL_SECONDS": "1e300"}, "RUNNER_POLL_INTERVAL_SECONDS: must be at most"),
        ({"RUNNER_POLL_INTERVAL_SECONDS": "soon"}, "RUNNER_POLL_INTERVAL_SECONDS: expected a number"),
        ({"RUNNER_MAX_REQUEST_BYTES": "0"}, "RUNNER_MAX_REQUEST_BYTES: must be at least 1024, got 0"),
        ({"RUNNER_MAX_REQUEST_BYTES": "-5"}, "RUNNER_MAX_REQUEST_BYTES: must be at least 1024"),
        ({"RUNNER_HEARTBEAT_SECONDS": "0"}, "RUNNER_HEARTBEAT_SECONDS: must be at least 1"),
        ({"RUNNER_KILL_GRACE_SECONDS": "-1"}, "RUNNER_KILL_GRACE_SECONDS: must be at least 0"),
        ({"RUNNER_DEFAULT_TIMEOUT_SECONDS": "0"}, "RUNNER_DEFAULT_TIMEOUT_SECONDS: must be at least 1"),
        ({"RUNNER_LOG_MAX_BYTES": "10"}, "RUNNER_LOG_MAX_BYTES: must be at least 1024"),
        ({"RUNNER_RETENTION_KEEP": "-1"}, "RUNNER_RETENTION_KEEP: must be at least 0"),
        # Past these, `now ± timedelta(...)` overflows at run time instead of failing here.
        (
            {"RUNNER_IDEMPOTENCY_WINDOW_SECONDS": "9" * 15},
            "RUNNER_IDEMPOTENCY_WINDOW_SECONDS: must be at most",
        ),
        (
            {"RUNNER_STALE_AFTER_SECONDS": "9" * 15, "RUNNER_HEARTBEAT_SECONDS": "30"},
            "RUNNER_STALE_AFTER_SECONDS: must be at most 315360000",
        ),
        ({"RUNNER_KILL_GRACE_SECONDS": "9" * 12}, "RUNNER_KILL_GRACE_SECONDS: must be at most"),
        ({"RUNNER_RETENTION_DAYS": "1000000000"}, "RUNNER_RETENTION_DAYS: must be at most 36500"),
        ({"RUNNER_BACKUP_MAX_AGE_DAYS": "99999999"}, "RUNNER_BACKUP_MAX_AGE_DAYS: must be at most"),
        ({"RUNNER_HTTP_MAX_CONNECTIONS": "7"}, "RUNNER_HTTP_MAX_CONNECTIONS: must be at least 8, got 7"),
        ({"RUNNER_HTTP_MAX_CONNECTIONS": "0"}, "RUNNER_HTTP_MAX_CONNECTIONS: must be at least 8"),
        ({"RUNNER_HTTP_MAX_CONNECTIONS": "many"}, "RUNNER_HTTP_MAX_CONNECTIONS: expected an integer"),
        ({"RUNNER_HTTP_MAX_CONNECTIONS": "2000000"}, "RUNNER_HTTP_MAX_CONNECTIONS: must be at most 1048576"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(env, cwd=tmp_path)
    assert fragment in exc.value.message
    assert "\n" not in exc.value.message
    if "RUNNER_ENCRYPTION_KEY" in env:
        assert env["RUNNER_ENCRYPTION_KEY"] not in exc.value.message
    if "RUNNER_DATABASE_URL" in env:
        assert "pw" not in exc.value.message and "Word99" not in exc.value.message


def test_an_empty_value_is_no_value(tmp_path: Path) -> None:
    """`RUNNER_HOST=` (a template left blank) must not become None (uvicorn then listened on every
    interface), nor an empty allowlist (every repo allowed) or no audit log: the runner.toml value
    applies, else the default."""
    (tmp_path / "runner.toml").write_text(
        '[runner]\ndata_dir = "srv-data"\naudit_log = "audit.log"\nallowed_repo_paths = ["/srv/git"]\n'
        'host = ""\n'
    )
    env = {"RUNNER_DATA_DIR": "", "RUNNER_AUDIT_LOG": " ", "RUNNER_ALLOWED_REPO_PATHS": "", "RUNNER_PORT": ""}
    s = load_settings({**env, "RUNNER_HOST": ""}, cwd=tmp_path)
    assert s.host == "127.0.0.1" and s.port == 8787
    assert s.data_dir == (tmp_path / "srv-data").resolve()
    assert s.audit_log == (tmp_path / "audit.log").resolve()
    assert s.allowed_repo_paths == ("/srv/git",)


def test_a_relative_codex_home_is_made_absolute(tmp_path: Path) -> None:
    """Handed to a job as CODEX_HOME, a relative path was resolved in the job's workspace: codex
    found no config there and wrote its sessions into the repo, which the commit then took."""
    s = load_settings({"RUNNER_CODEX_HOME": "my-codex-home"}, cwd=tmp_path)
    assert s.codex_home == (tmp_path / "my-codex-home").resolve()


def test_numbers_in_range(tmp_path: Path) -> None:
    s = load_settings(
        {
            "RUNNER_POLL_INTERVAL_SECONDS": "0.05",
            "RUNNER_MAX_REQUEST_BYTES": "1024",
            "RUNNER_KILL_GRACE_SECONDS": "0",
            "RUNNER_RETENTION_DAYS": "0",
            "RUNNER_IDEMPOTENCY_WINDOW_SECONDS": str(10 * 365 * 86400),
        },
        cwd=tmp_path,
    )
    assert (s.poll_interval_seconds, s.max_request_bytes, s.kill_grace_seconds) == (0.05, 1024, 0)
    assert s.idempotency_window_seconds == 315360000 and s.retention_days == 0
    (tmp_path / "runner.toml").write_text("[runner]\npoll_interval_seconds = 2\n")
    assert load_settings({}, cwd=tmp_path).poll_interval_seconds == 2.0
    (tmp_path / "runner.toml").write_text("[runner]\npoll_interval_seconds = nan\n")
    with pytest.raises(ConfigError, match=r"\[runner\].poll_interval_seconds: must be a finite number"):
        load_settings({}, cwd=tmp_path)
    (tmp_path / "runner.toml").write_text("[runner]\npoll_interval_seconds = true\n")
    with pytest.raises(ConfigError, match=r"\[runner\].poll_interval_seconds: expected a number"):
        load_settings({}, cwd=tmp_path)


def test_toml_errors(tmp_path: Path) -> None:
    (tmp_path / "runner.toml").write_text("[runner]\nmax_concurency = 4\n")
    with pytest.raises(ConfigError, match=r"\[runner\].max_concurency: unknown setting"):
        load_settings({}, cwd=tmp_path)
    (tmp_path / "runner.toml").write_text("[runner\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, cwd=tmp_path)
    (tmp_path / "runner.toml").write_text('[runner]\nmax_concurrency = "many"\n')
    with pytest.raises(ConfigError, match=r"runner.toml \[runner\].max_concurrency: expected an integer"):
        load_settings({}, cwd=tmp_path)


def test_lists_json_or_colon_separated(tmp_path: Path) -> None:
    s = load_settings(
        {
            "RUNNER_ALLOWED_REPO_PATHS": "/srv/a:/srv/b",
            "RUNNER_ALLOWED_GIT_URL_PREFIXES": "https://h.com:8443/acme:ssh://git@h/x",
        },
        cwd=tmp_path,
    )
    assert s.allowed_repo_paths == ("/srv/a", "/srv/b")
    assert s.allowed_git_url_prefixes == ("https://h.com:8443/acme", "ssh://git@h/x")
    s = load_settings({"RUNNER_ALLOWED_REPO_PATHS": '["/a:b", "/c"]'}, cwd=tmp_path)
    assert s.allowed_repo_paths == ("/a:b", "/c")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('allowed_repo_paths = ["/a\\u0000b"]', "must not hold a NUL character"),
        ("allowed_repo_paths = 5", "expected a string or a list of strings, got int"),
        ("allowed_git_url_prefixes = [1, 2]", "expected a list of strings"),
    ],
)
def test_list_settings_are_strings_without_nul(tmp_path: Path, toml: str, message: str) -> None:
    """docs/configuration.md: no setting may hold a NUL, and a runner.toml text setting is a TOML
    string. Lists escaped both: a NUL in an allowed path failed every create on a local repo (a
    500), and `allowed_repo_paths = 5` became the list ["5"]."""
    (tmp_path / "runner.toml").write_text(f"[runner]\n{toml}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings({}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="NUL"):
        load_settings({"RUNNER_ALLOWED_REPO_PATHS": '["/a\\u0000b"]'}, cwd=tmp_path / "elsewhere")


def test_a_blank_runner_config_is_not_set(tmp_path: Path) -> None:
    """An empty or blank value counts as not set (docs/configuration.md); RUNNER_CONFIG="  " was
    taken as a file name, and start-up stopped: "file …/   does not exist"."""
    (tmp_path / "runner.toml").write_text("[runner]\nmax_concurrency = 3\n")
    assert load_settings({"RUNNER_CONFIG": "  "}, cwd=tmp_path).max_concurrency == 3


def test_secret_values_never_include_sqlite_url(tmp_path: Path) -> None:
    s = load_settings({"RUNNER_JWT_SECRET": "jwt-secret-123456"}, cwd=tmp_path)
    assert s.secret_values() == ["jwt-secret-123456"]
    pg = load_settings({"RUNNER_DATABASE_URL": "postgresql://u:pw@h/db"}, cwd=tmp_path)
    assert "postgresql://u:pw@h/db" in pg.secret_values()


def test_secret_values_hold_the_redis_url_and_the_passwords_of_both_urls(tmp_path: Path) -> None:
    """RUNNER_REDIS_URL carries the Redis password (`redis://:password@host`, SPEC §10) as
    RUNNER_DATABASE_URL carries PostgreSQL's: neither the URL nor the password alone (what a
    script or a client library prints, `AUTH <password>`) may reach a job's raw log or a
    service log unmasked."""
    s = load_settings(
        {
            "RUNNER_DATABASE_URL": "postgresql://u:Pg-Passw0rd-42@h/db",
            "RUNNER_REDIS_URL": "redis://:S3cretRedisPassw0rd@cache:6379/0",
        },
        cwd=tmp_path,
    )
    values = s.secret_values()
    assert "redis://:S3cretRedisPassw0rd@cache:6379/0" in values
    assert "S3cretRedisPassw0rd" in values and "Pg-Passw0rd-42" in values
    # A URL without a password adds itself only: no empty or None value.
    bare = load_settings({"RUNNER_REDIS_URL": "redis://cache:6379/0"}, cwd=tmp_path)
    assert bare.secret_values() == ["redis://cache:6379/0"]
    # Percent-encoded in the URL, the password is masked as the client sends it, decoded.
    encoded = load_settings({"RUNNER_REDIS_URL": "redis://:p%40ss-Word-123@cache/0"}, cwd=tmp_path)
    assert "p@ss-Word-123" in encoded.secret_values()


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"RUNNER_AUDIT_LOG_BACKUPS": "1000000000"}, "RUNNER_AUDIT_LOG_BACKUPS: must be at most 1000"),
        ({"RUNNER_RETENTION_KEEP": "100000000000000000000"}, "RUNNER_RETENTION_KEEP: must be at most"),
        ({"RUNNER_ID": "x" * 250}, "RUNNER_ID: 1-200 characters"),
        ({"RUNNER_ID": "a\n[runner] forged"}, "RUNNER_ID: 1-200 characters"),
        ({"RUNNER_ID": "has space"}, "RUNNER_ID: 1-200 characters"),
        ({"RUNNER_GIT_AUTHOR_NAME": "<>"}, "RUNNER_GIT_AUTHOR_NAME"),
        ({"RUNNER_GIT_AUTHOR_NAME": " . "}, "RUNNER_GIT_AUTHOR_NAME"),
        ({"RUNNER_GIT_AUTHOR_EMAIL": "<x@y>"}, "RUNNER_GIT_AUTHOR_EMAIL"),
    ],
)
def test_values_that_failed_later_stop_start_up(tmp_path: Path, env: dict[str, str], fragment: str) -> None:
    """Each was accepted, then failed at its first use: a rotation that hung, a retention pass
    that overflowed on every run, a registration a column could not hold (or a log line forged
    by a newline), every commit refused by git."""
    with pytest.raises(ConfigError) as exc:
        load_settings(env, cwd=tmp_path)
    assert fragment in str(exc.value)
    assert load_settings({"RUNNER_ID": "host-1.example:a@b_c"}, cwd=tmp_path).id == "host-1.example:a@b_c"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?cache=shared&uri=true",
        "sqlite:///file:runner?mode=memory&uri=true",
    ],
)
def test_an_in_memory_sqlite_database_is_refused(tmp_path: Path, url: str) -> None:
    """It was accepted, then every command failed with `unexpected TypeError ... max_overflow`
    (SQLAlchemy's pool for an in-memory database takes no pool size); and had it worked, each
    pooled connection would have had its own empty database."""
    with pytest.raises(ConfigError) as exc:
        load_settings({"RUNNER_DATABASE_URL": url}, cwd=tmp_path)
    assert exc.value.message.startswith("RUNNER_DATABASE_URL: an in-memory SQLite database")
    assert "own empty database" in exc.value.message
    db = tmp_path / "runner.db"
    assert load_settings({"RUNNER_DATABASE_URL": f"sqlite:///{db}"}, cwd=tmp_path).database_url.endswith(
        "runner.db"
    )


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("jwt_secret = true", "[runner].jwt_secret: expected a string, got bool"),
        ('host = ["0.0.0.0"]', "[runner].host: expected a string, got list"),
        ('data_dir = "/tmp/a\\u0000b"', "[runner].data_dir: expected a path"),
        ('token = "t"', "RUNNER_TOKEN is read from the environment only"),
    ],
)
def test_runner_toml_strings_are_strings(tmp_path: Path, toml: str, fragment: str) -> None:
    """`jwt_secret = true` became the secret "True", a list a host name of brackets, a NUL in a
    path an unexpected ValueError naming no setting; and the client's token was read from a file."""
    (tmp_path / "runner.toml").write_text(f"[runner]\n{toml}\n")
    with pytest.raises(ConfigError) as exc:
        load_settings({}, cwd=tmp_path)
    assert fragment in str(exc.value)


def test_http_max_connections(tmp_path: Path) -> None:
    assert load_settings({}, cwd=tmp_path).http_max_connections == 1024
    assert load_settings({"RUNNER_HTTP_MAX_CONNECTIONS": "8"}, cwd=tmp_path).http_max_connections == 8
    (tmp_path / "runner.toml").write_text("[runner]\nhttp_max_connections = 4096\n")
    assert load_settings({}, cwd=tmp_path).http_max_connections == 4096
    (tmp_path / "runner.toml").write_text("[runner]\nhttp_max_connections = 2\n")
    with pytest.raises(ConfigError) as exc:
        load_settings({}, cwd=tmp_path)
    assert exc.value.message == "runner.toml [runner].http_max_connections: must be at least 8, got 2"


def test_errors_name_the_config_file_runner_config_gives(tmp_path: Path) -> None:
    """RUNNER_CONFIG=/etc/codex-runner/prod.toml: every error said `runner.toml`, a file the
    operator may not have at all."""
    from codex_runner.catalog import Catalog

    conf = tmp_path / "prod.toml"
    conf.write_text("[runner]\nmax_concurency = 3\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(conf))} \[runner\]\.max_concurency: unknown setting"
    ):
        load_settings({"RUNNER_CONFIG": str(conf)}, cwd=tmp_path)
    conf.write_text('[repos.widgets]\nsource = "relative/path"\n')
    settings = load_settings({"RUNNER_CONFIG": "prod.toml"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(conf))} \[repos\.widgets\]"):
        Catalog.from_settings(settings)
    # The default file keeps its short name.
    (tmp_path / "runner.toml").write_text("[runner]\nmax_concurency = 3\n")
    with pytest.raises(ConfigError, match=r"^runner\.toml \[runner\]\.max_concurency"):
        load_settings({}, cwd=tmp_path)


def test_the_word_settings_take_any_case(tmp_path: Path) -> None:
    """RUNNER_JOB_ISOLATION and RUNNER_LOG_FORMAT are words like the booleans' `true`/`YES`:
    `Required` or `JSON` failed the start as unknown values."""
    s = load_settings({"RUNNER_JOB_ISOLATION": "Required", "RUNNER_LOG_FORMAT": " JSON "}, cwd=tmp_path)
    assert (s.job_isolation, s.log_format) == ("required", "json")
    with pytest.raises(ConfigError, match="RUNNER_LOG_FORMAT: expected json or console"):
        load_settings({"RUNNER_LOG_FORMAT": "yaml"}, cwd=tmp_path)
