"""Settings from the environment, then the `[runner]` table of runner.toml; environment wins.

Validated once at start-up: a bad value raises `ConfigError` whose message is one line naming the
setting and the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from codex_runner.errors import ConfigError

ENV_PREFIX = "RUNNER_"


def _parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _parse_int(name: str, raw: object, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(raw, bool):
        raise ConfigError(f"{name}: expected an integer, got {raw!r}")
    try:
        value = int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}: must be at most {maximum}, got {value}")
    return value


def _parse_seconds(name: str, raw: object) -> float:
    """A positive, finite number of seconds: `float()` takes "nan" and "inf", and a zero or
    negative period would spin a poll loop or make `asyncio` wait for nothing."""
    if isinstance(raw, bool):
        raise ConfigError(f"{name}: expected a number, got {raw!r}")
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be a finite number greater than 0, got {raw!r}")
    if value > MAX_SECONDS:
        raise ConfigError(f"{name}: must be at most {MAX_SECONDS}, got {raw!r}")
    return value


def _parse_list(name: str, raw: object) -> tuple[str, ...]:
    if isinstance(raw, list | tuple):
        if not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{name}: expected a list of strings")
        items = list(raw)
    elif not isinstance(raw, str):
        # runner.toml: `allowed_repo_paths = 5` became the list ["5"].
        raise ConfigError(f"{name}: expected a string or a list of strings, got {type(raw).__name__}")
    else:
        text = raw.strip()
        if not text:
            return ()
        if text.startswith("["):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name}: not a valid JSON array ({exc.msg})") from None
            if not isinstance(loaded, list) or not all(isinstance(x, str) for x in loaded):
                raise ConfigError(f"{name}: expected a JSON array of strings")
            items = loaded
        elif "://" in text:
            # URLs hold colons of their own (scheme, port): split only where a colon starts
            # neither "//" nor a port number. A JSON array says it without ambiguity.
            items = [part for part in re.split(r":(?!//)(?!\d)", text) if part]
        else:
            items = [part for part in text.split(":") if part]
    if any("\0" in item for item in items):
        # A path with a NUL failed at every create on a local repo (a 500), not at start-up.
        raise ConfigError(f"{name}: must not hold a NUL character")
    return tuple(items)


def _default_runner_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Settings:
    """Every `RUNNER_*` setting, typed. Paths are absolute after `load_settings`."""

    config: Path | None = None
    data_dir: Path = Path(".runner-data")
    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8787
    # 0: a `worker` serves no HTTP at all (as before there was this setting).
    worker_metrics_port: int = 0
    id: str = ""
    enabled: bool = True
    max_concurrency: int = 2
    max_jobs_per_user: int = 3
    max_queue_size: int = 200
    max_queued_per_user: int = 20
    default_timeout_seconds: int = 3600
    heartbeat_seconds: int = 30
    stale_after_seconds: int = 120
    db_answer_timeout_seconds: int = 45
    kill_grace_seconds: int = 10
    idempotency_window_seconds: int = 86400
    log_dir: Path = Path()
    log_max_bytes: int = 64 * 1024 * 1024
    workspace_dir: Path = Path()
    cleanup_after_job: bool = True
    keep_failed_workspaces: bool = False
    warm_workspaces: int = 1
    allowed_repo_paths: tuple[str, ...] = ()
    allowed_git_url_prefixes: tuple[str, ...] = ()
    encryption_key: str | None = None
    encryption_key_previous: str | None = None
    retention_days: int = 30
    retention_keep: int = 100
    retention_interval_seconds: int = 86400
    audit_log: Path | None = None
    audit_log_max_bytes: int = 5 * 1024 * 1024
    audit_log_backups: int = 5
    log_format: str = "json"
    jwt_secret: str | None = None
    production: bool = False
    allow_remote: bool = False
    backup_dir: Path = Path()
    backup_max_age_days: int = 7
    redis_url: str | None = None
    url: str = "http://127.0.0.1:8787"
    token: str | None = None
    codex_home: Path | None = None
    git_author_name: str = "codex-runner"
    git_author_email: str = "codex-runner@localhost"
    poll_interval_seconds: float = 1.0
    max_request_bytes: int = 1024 * 1024
    # Log streams one user may have open on one instance at once (api/logs.py).
    max_streams_per_user: int = 32
    # A request must arrive whole within this many seconds of the connection opening or the last
    # answer ending (api/connection.py).
    http_request_timeout_seconds: int = 60
    # Connections one HTTP server (`serve`, a worker's metrics port) holds at once; one more is
    # answered 503 and closed (api/gate.py).
    http_max_connections: int = 1024
    # Landlock confinement of every job's processes (execution/sandbox.py): auto, required, off.
    job_isolation: str = "auto"
    # RLIMIT_NPROC of every job's processes (execution/limits.py); 0: the runner's own.
    job_max_processes: int = 8192
    # Paths beyond the runner's own files that no job may reach (execution/sandbox.py).
    job_hidden_paths: tuple[str, ...] = ()
    # The raw [repos.*] and [scripts.*] tables; catalog.py gives them meaning.
    repos: Mapping[str, Any] = field(default_factory=dict)
    scripts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def mirrors_dir(self) -> Path:
        return self.data_dir / "mirrors"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def secret_values(self) -> list[str]:
        """The runner's own secrets: they must never reach a script, a log or a response."""
        values = [self.encryption_key, self.encryption_key_previous, self.jwt_secret, self.token]
        urls = [] if self.is_sqlite else [self.database_url]
        if self.redis_url:
            urls.append(self.redis_url)
        for url in urls:
            # The password alone too: a client library or a script prints it without its URL.
            values += [url, _url_password(url)]
        return [v for v in values if v]


def _url_password(url: str) -> str | None:
    try:
        password = urlsplit(url).password
    except ValueError:  # an unclosed `[`: the URL is masked whole all the same
        return None
    return unquote(password) if password else None


# Durations end up in `timedelta`s and in `now ± duration`, which overflow (a 500 on every create,
# a crashed watchdog) long before Python's integers do: ten years, or a century of days, is past
# any sensible setting and far from those limits.
MAX_SECONDS = 10 * 365 * 86400
_RUNNER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
MAX_DAYS = 100 * 365

_INT_MINIMUMS: dict[str, int] = {
    "port": 1,
    "max_concurrency": 1,
    "max_jobs_per_user": 1,
    "max_queue_size": 1,
    "max_queued_per_user": 1,
    "default_timeout_seconds": 1,
    "heartbeat_seconds": 1,
    "stale_after_seconds": 1,
    "db_answer_timeout_seconds": 1,
    "idempotency_window_seconds": 1,
    "log_max_bytes": 1024,
    "audit_log_max_bytes": 1024,
    "retention_interval_seconds": 1,
    # 0 would refuse every request body with 413; the smallest create body is about 50 bytes.
    "max_request_bytes": 1024,
    "http_request_timeout_seconds": 1,
    # Fewer would leave no room for a scrape and a health check beside a few clients.
    "http_max_connections": 8,
    # 0 would refuse every log stream with 429 (docs/configuration.md: at least 1).
    "max_streams_per_user": 1,
}

_INT_MAXIMUMS: dict[str, int] = {
    "port": 65535,
    "worker_metrics_port": 65535,
    "warm_workspaces": 16,
    "default_timeout_seconds": MAX_SECONDS,
    "heartbeat_seconds": MAX_SECONDS,
    "stale_after_seconds": MAX_SECONDS,
    "db_answer_timeout_seconds": MAX_SECONDS,
    "kill_grace_seconds": MAX_SECONDS,
    "http_request_timeout_seconds": MAX_SECONDS,
    # Linux's own ceiling on a process's open files (fs.nr_open) by default.
    "http_max_connections": 1 << 20,
    "idempotency_window_seconds": MAX_SECONDS,
    "retention_interval_seconds": MAX_SECONDS,
    "retention_days": MAX_DAYS,
    "backup_max_age_days": MAX_DAYS,
    # Rotation renames every backup once: a billion would hang the first rotation (holding the
    # audit lock every job event waits on).
    "audit_log_backups": 1000,
    "log_max_bytes": 1 << 50,
    "audit_log_max_bytes": 1 << 50,
    "max_request_bytes": 1 << 50,
    # Linux's own ceiling on process ids (kernel.pid_max at most).
    "job_max_processes": 1 << 22,
}
# Any other count: what the database's integers hold (SQLite's end at 2**63, and a value past
# them failed only at the first query that used it: retention on every pass, for one).
_INT_DEFAULT_MAXIMUM = 2**63 - 1

_SKIP = {"repos", "scripts", "config"}


def _coerce(name: str, env_name: str, raw: object, current: object) -> object:
    """Converts one raw value to the type of the field's default."""
    f_type = type(current)
    if name in {"allowed_repo_paths", "allowed_git_url_prefixes", "job_hidden_paths"}:
        return _parse_list(env_name, raw)
    if f_type is bool:
        return _parse_bool(env_name, raw)
    if f_type is int:
        return _parse_int(
            env_name, raw, _INT_MINIMUMS.get(name, 0), _INT_MAXIMUMS.get(name, _INT_DEFAULT_MAXIMUM)
        )
    if f_type is float:  # the only one is poll_interval_seconds
        return _parse_seconds(env_name, raw)
    if name in {"data_dir", "log_dir", "workspace_dir", "backup_dir", "audit_log", "codex_home"}:
        if not isinstance(raw, str) or "\0" in raw:
            raise ConfigError(f"{env_name}: expected a path (a string without NUL)")
        text = raw.strip()
        return Path(text).expanduser() if text else None
    if not isinstance(raw, str):
        # runner.toml: `jwt_secret = true` became the secret "True", `host = ["0.0.0.0"]` a host
        # name of brackets.
        raise ConfigError(f"{env_name}: expected a string, got {type(raw).__name__}")
    if "\0" in raw:
        raise ConfigError(f"{env_name}: must not contain a NUL character")
    return raw if raw != "" else None


def _blank(value: object) -> bool:
    return isinstance(value, str) and not value.strip()


def _check_database_url(url: str) -> None:
    """A URL SQLAlchemy cannot parse (or whose port is not a number) names the setting; the URL
    itself is never repeated: it may hold the password."""
    import sqlalchemy as sa

    try:
        parsed = sa.engine.make_url(url)
        port = parsed.port
    except Exception:
        raise ConfigError(
            "RUNNER_DATABASE_URL: not a valid database URL (is its port a number? percent-encode "
            "special characters in the user name and password)"
        ) from None
    if port is not None and not 0 < port < 65536:
        raise ConfigError("RUNNER_DATABASE_URL: the port must be 1-65535")
    if parsed.get_backend_name() == "sqlite" and _sqlite_in_memory(parsed):
        raise ConfigError(
            "RUNNER_DATABASE_URL: an in-memory SQLite database cannot be used: each connection of "
            "the pool (and each process) would get its own empty database; give a file, "
            "sqlite:///path/to/runner.db"
        )
    if parsed.host and any(c in parsed.host for c in "@#?/ "):
        # A password with an unencoded '@' leaves part of it in the host name, which a connection
        # error would then print.
        raise ConfigError(
            "RUNNER_DATABASE_URL: the host name holds '@', '#', '?', '/' or a space: "
            "percent-encode those characters in the user name and password"
        )


def _sqlite_in_memory(parsed: Any) -> bool:
    """`sqlite://`, `sqlite:///:memory:`, and the URI forms `file::memory:` and `?mode=memory`."""
    database = parsed.database or ""
    return (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or parsed.query.get("mode") == "memory"
    )


# git's "crud" around an identity: what it strips, and refuses a name made only of.
_GIT_CRUD = set(" .,:;<>\"\\'")


def _check_git_identity(values: Mapping[str, object]) -> None:
    """The runner's commits would all fail (`commit_failed`) on an identity git refuses: a name of
    only punctuation and spaces, `<`/`>` (they delimit the email), control characters."""
    name, email = values.get("git_author_name"), values.get("git_author_email")
    if isinstance(name, str) and (
        all(c in _GIT_CRUD or ord(c) < 32 for c in name) or any(c in "<>" or ord(c) < 32 for c in name)
    ):
        raise ConfigError(
            "RUNNER_GIT_AUTHOR_NAME: needs a letter or digit, and no '<', '>' or control characters"
        )
    if isinstance(email, str) and (not email.strip() or any(c in "<> " or ord(c) < 32 for c in email)):
        raise ConfigError(
            "RUNNER_GIT_AUTHOR_EMAIL: must not be blank or hold '<', '>', spaces or control characters"
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"RUNNER_CONFIG: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"RUNNER_CONFIG: {path} is not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"RUNNER_CONFIG: cannot read {path} ({exc.strerror})") from None


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Reads and validates every setting. Raises `ConfigError` with one readable line."""
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    config_raw = (env.get("RUNNER_CONFIG") or "").strip()  # blank: not set, as every setting
    config_path: Path | None
    if config_raw:
        config_path = (cwd / config_raw).resolve()
        doc = _read_toml(config_path)
    else:
        candidate = cwd / "runner.toml"
        config_path = candidate.resolve() if candidate.is_file() else None
        doc = _read_toml(candidate) if config_path else {}

    # Errors name the file the operator gave (RUNNER_CONFIG), not always `runner.toml`.
    label = config_source(config_path)
    runner_table = doc.get("runner", {})
    if not isinstance(runner_table, dict):
        raise ConfigError(f"{label} [runner]: must be a table")
    known = {f.name for f in fields(Settings)} - _SKIP
    for key in runner_table:
        if key not in known:
            raise ConfigError(f"{label} [runner].{key}: unknown setting")
        if key == "token":  # a client's credential: the environment's, never a file's
            raise ConfigError(f"{label} [runner].token: RUNNER_TOKEN is read from the environment only")

    defaults = Settings()
    values: dict[str, object] = {}
    for f in fields(Settings):
        if f.name in _SKIP:
            continue
        env_name = ENV_PREFIX + f.name.upper()
        current = getattr(defaults, f.name)
        # An empty value is no value: `RUNNER_HOST=` (a template left blank) falls through to
        # runner.toml and then the default; taken as set, it became None (uvicorn then listened on
        # every interface, an empty allowlist allowed every repo, the audit log went off).
        if str(env.get(env_name, "")).strip():
            values[f.name] = _coerce(f.name, env_name, env[env_name], current)
        elif f.name in runner_table and not _blank(runner_table[f.name]):
            values[f.name] = _coerce(f.name, f"{label} [runner].{f.name}", runner_table[f.name], current)
    if overrides:
        values.update(overrides)

    data_dir = Path(str(values.get("data_dir") or defaults.data_dir))
    if not data_dir.is_absolute():
        data_dir = (cwd / data_dir).resolve()
    values["data_dir"] = data_dir

    def under_data(name: str, sub: str) -> None:
        p = values.get(name)
        if not p:
            values[name] = data_dir / sub
        elif not Path(str(p)).is_absolute():
            values[name] = (cwd / str(p)).resolve()

    under_data("log_dir", "logs")
    under_data("workspace_dir", "workspaces")
    under_data("backup_dir", "backups")
    for name in ("audit_log", "codex_home"):
        # codex_home too: handed to a job as CODEX_HOME, a relative path resolved in its workspace.
        if values.get(name) and not Path(str(values[name])).is_absolute():
            values[name] = (cwd / str(values[name])).resolve()
    if not values.get("database_url"):
        values["database_url"] = f"sqlite:///{data_dir / 'runner.db'}"
    if not values.get("id"):
        values["id"] = _default_runner_id()
    elif not _RUNNER_ID.fullmatch(str(values["id"])):
        # It is a column of 200 characters, and it goes into log lines and process environments.
        raise ConfigError(
            "RUNNER_ID: 1-200 characters of letters, digits and . _ : @ - (no spaces or control characters)"
        )
    _check_git_identity(values)
    for name in ("job_isolation", "log_format"):
        # Words, not names: `Auto` or `JSON` mean what booleans' `True` and `YES` do.
        if name in values:
            values[name] = str(values[name]).strip().lower()
    if values.get("job_isolation", "auto") not in {"auto", "required", "off"}:
        raise ConfigError(
            f"RUNNER_JOB_ISOLATION: expected auto, required or off, got {values['job_isolation']!r}"
        )
    hidden = cast(tuple[str, ...], values.get("job_hidden_paths") or ())
    values["job_hidden_paths"] = tuple(str((cwd / Path(p).expanduser()).resolve()) for p in hidden)
    if values.get("log_format", "json") not in {"json", "console"}:
        raise ConfigError(f"RUNNER_LOG_FORMAT: expected json or console, got {values['log_format']!r}")
    url = str(values["database_url"])
    if not (url.startswith("sqlite") or url.startswith("postgresql")):
        hint = ": write postgresql:// for postgres://" if url.startswith("postgres://") else ""
        raise ConfigError(f"RUNNER_DATABASE_URL: expected a sqlite:/// or postgresql:// URL{hint}")
    _check_database_url(url)
    for name in ("encryption_key", "encryption_key_previous"):
        if values.get(name):
            from codex_runner.secrets import parse_key

            try:
                parse_key(str(values[name]))
            except Exception:
                # What to do differs: a new key comes from keygen, the previous one was in use.
                fix = (
                    "`codex-runner keygen` makes one"
                    if name == "encryption_key"
                    else "the key before the rotation, as RUNNER_ENCRYPTION_KEY held it"
                )
                raise ConfigError(
                    f"RUNNER_{name.upper()}: expected 64 hex characters, base64 of 32 bytes, or 32 raw "
                    f"bytes; {fix}"
                ) from None
    stale = int(values.get("stale_after_seconds", defaults.stale_after_seconds))  # type: ignore[call-overload]
    beat = int(values.get("heartbeat_seconds", defaults.heartbeat_seconds))  # type: ignore[call-overload]
    if stale <= beat:
        raise ConfigError(
            f"RUNNER_STALE_AFTER_SECONDS: must be greater than RUNNER_HEARTBEAT_SECONDS ({stale} <= {beat})"
        )

    repos = doc.get("repos", {})
    scripts = doc.get("scripts", {})
    if not isinstance(repos, dict):
        raise ConfigError(f"{label} [repos]: must be a table of tables")
    if not isinstance(scripts, dict):
        raise ConfigError(f"{label} [scripts]: must be a table of tables")
    return Settings(config=config_path, repos=repos, scripts=scripts, **values)  # type: ignore[arg-type]


def config_source(config_path: Path | None) -> str:
    """How configuration errors name the config file: its name (`runner.toml` by default), or
    the whole path when RUNNER_CONFIG names a file called otherwise, so the operator finds it."""
    if config_path is None or config_path.name == "runner.toml":
        return "runner.toml"
    return str(config_path)


SettingsFactory = Callable[[], Settings]


def make_data_dir(settings: Settings) -> None:
    """Makes a missing data folder 0700 (docs/operations.md, Install): it holds the logs, the
    workspaces, codex's login and (SQLite) every job's arguments. Call it before anything makes a
    folder inside it, which would make it with the umask's mode (0755) on the way. One that exists
    keeps its mode: `data_dir_permissions` reports it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


def folder_problem(exc: OSError) -> str:
    """Why a folder could not be made or written, in a few words."""
    if isinstance(exc, FileExistsError | NotADirectoryError):
        # A file where the folder, or one of its parents, should be.
        return "it (or a folder above it) exists and is not a folder"
    return exc.strerror or str(exc)
