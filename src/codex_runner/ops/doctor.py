"""Start-up checks (SPEC §9), shared by `serve` start-up, `codex-runner doctor` and `/readyz`.

A check is `ok`, a warning (`ok=False, blocking=False`) or a failure (`ok=False, blocking=True`).
With RUNNER_PRODUCTION=true the unsafe-setting warnings become failures. Messages are one readable
line that says what is wrong and what to do; they never carry a secret value.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from codex_runner import secrets
from codex_runner.catalog import BUILTIN_SCRIPTS, Catalog, RepoSpec, ScriptSpec
from codex_runner.catalog.specs import PLACEHOLDER
from codex_runner.config import Settings, folder_problem
from codex_runner.errors import ConfigError, RunnerError
from codex_runner.execution import codex_version, sandbox, spare_watch
from codex_runner.execution.agents import BYPASS_FLAGS, is_codex_exec
from codex_runner.execution.git import is_loopback_host
from codex_runner.ops import audit, fdlimit
from codex_runner.ops.backup import newest_backup
from codex_runner.store import create_store_engine
from codex_runner.store.migrate import current_revision, head_revision, is_known, newer_schema_message
from codex_runner.store.records import utcnow
from codex_runner.store.schema import credentials

if TYPE_CHECKING:
    from codex_runner.runtime import Runtime

log = structlog.get_logger("codex_runner.doctor")

MIB = 1024 * 1024
DISK_WARN_BYTES = 1024 * MIB
DISK_FAIL_BYTES = 100 * MIB
MIN_MASKABLE = 8
DANGEROUS_FLAG = "--dangerously-bypass-approvals-and-sandbox"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    blocking: bool
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> str:
        return "ok" if self.ok else ("fail" if self.blocking else "warn")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "blocking": self.blocking,
            "level": self.level,
            "message": self.message,
            "detail": self.detail,
        }


def _ok(name: str, message: str, **detail: Any) -> Check:
    return Check(name, True, False, message, detail)


def _fail(name: str, message: str, **detail: Any) -> Check:
    return Check(name, False, True, message, detail)


def _warn(name: str, message: str, *, production: bool = False, **detail: Any) -> Check:
    """A warning that production mode turns into a failure when `production` is true."""
    return Check(name, False, production, message, detail)


def run_checks(settings: Settings, catalog: Catalog, engine: Engine | None = None) -> list[Check]:
    """Every check, in a stable order. `engine` None: one is made for the checks and disposed."""
    own = engine is None
    eng = engine
    checks: list[Check] = []
    if eng is None:
        try:
            eng = create_store_engine(settings.database_url, pool_size=1)
        except OSError as exc:
            # SQLite: the database's folder could not be made (a file in the way, no permission).
            checks.append(_database_folder(settings, exc))
    try:
        if eng is not None:
            checks += _database(eng)
        db_ok = eng is not None and all(c.ok for c in checks)
        if eng is not None and db_ok and eng.dialect.name == "postgresql":
            checks.append(_clock(settings, eng))
        checks += _folders(settings)
        checks.append(_audit_log(settings))
        checks += _scripts(settings, catalog)
        checks += _codex_version(catalog)
        checks += _repos(settings, catalog)
        checks.append(_git())
        checks.append(_reaper())
        checks.append(_runs_as_root())
        checks.append(_fd_limit(settings))
        checks.append(_job_isolation(settings))
        checks += _codex_sandbox(catalog)
        checks.append(_spare_watch(settings, catalog))
        checks += _encryption(settings, eng if db_ok else None)
        checks += _repo_credentials(catalog, eng if db_ok else None)
        checks += _disk(settings)
        checks += _secrets(settings)
        checks += _unsafe_settings(settings)
        checks.append(_backup(settings))
        return checks
    finally:
        if own and eng is not None:
            eng.dispose()


def blocking_failures(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.blocking and not c.ok]


# -- database ---------------------------------------------------------------------------------


def _database_folder(settings: Settings, exc: OSError) -> Check:
    folder = Path(sa.engine.make_url(settings.database_url).database or ".").parent
    return _fail(
        "database",
        f"database folder {folder} is not usable: {folder_problem(exc)}",
        path=str(folder),
    )


def _database(engine: Engine) -> Iterator[Check]:
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        # The driver's first line names host and cause; the URL (and its password) is not in it.
        first = (str(getattr(exc, "orig", exc)).strip().splitlines() or [type(exc).__name__])[0]
        yield _fail("database", f"database not reachable ({engine.dialect.name}): {first[:200]}")
        return
    yield _ok("database", f"database reachable ({engine.dialect.name})")
    current, head = current_revision(engine), head_revision()
    if not is_known(current):
        yield _fail("migrations", newer_schema_message(current), current=current, head=head)
    elif current != head:
        yield _fail(
            "migrations",
            f"database schema is at {current or 'nothing'}, expected {head}: run `codex-runner migrate`",
            current=current,
            head=head,
        )
    else:
        yield _ok("migrations", f"database schema at head ({head})")


#: A clock this far from the database's is worth a warning (see `_clock`).
CLOCK_WARN_SECONDS = 1.0


def _clock(settings: Settings, engine: Engine) -> Check:
    """This host's clock against the database server's. Heartbeats, the watchdog's stale threshold
    and live instances go by the server's clock, so skew no longer fails live jobs or keeps dead
    ones; it still shifts what this host writes by its own: the jobs' start and finish times, the
    idempotency window's end and the ages retention compares. A warning, never a refusal."""
    try:
        before = time.time()
        with engine.connect() as conn:
            server = conn.execute(sa.text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar_one()
        after = time.time()
    except Exception as exc:
        return _warn("clock", f"could not read the database's clock ({type(exc).__name__})")
    skew = float(server) - (before + after) / 2
    if abs(skew) >= CLOCK_WARN_SECONDS:
        return _warn(
            "clock",
            f"this host's clock is {abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} the database "
            "server's: job times, idempotency windows and retention ages written here are off by as "
            "much; keep every runner host's clock in sync (NTP)",
        )
    return _ok("clock", f"clock within {CLOCK_WARN_SECONDS:.0f} s of the database server's ({skew:+.3f} s)")


# -- folders and disk -------------------------------------------------------------------------


def _folders(settings: Settings) -> Iterator[Check]:
    for label, path in (
        ("data", settings.data_dir),
        ("log", settings.log_dir),
        ("workspace", settings.workspace_dir),
    ):
        name = f"folder:{label}"
        try:
            # The data folder private from the start: `data_dir_permissions` asks for it.
            path.mkdir(parents=True, exist_ok=True, mode=0o700 if label == "data" else 0o777)
            if not path.is_dir():
                raise NotADirectoryError(f"{path} exists and is not a folder")
            # A real write: os.access lies for root and for read-only mounts.
            with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
                pass
        except OSError as exc:
            yield _fail(name, f"{label} folder {path} is not usable: {folder_problem(exc)}", path=str(path))
        else:
            yield _ok(name, f"{label} folder {path} is writable", path=str(path))


def _audit_log(settings: Settings) -> Check:
    """An audit log whose folder cannot be made stopped `serve` after doctor passed it; one that
    cannot be written loses every audit line (each failed write is only a service-log warning)."""
    path = settings.audit_log
    if path is None:
        return _ok("audit_log", "no audit log (RUNNER_AUDIT_LOG not set)")
    try:
        audit.check_writable(path)
    except OSError as exc:
        return _fail("audit_log", f"RUNNER_AUDIT_LOG: {audit.unusable(path, exc)}", path=str(path))
    return _ok("audit_log", f"audit log {path} is writable", path=str(path))


def _disk(settings: Settings) -> Iterator[Check]:
    seen: set[int] = set()
    for path in (settings.data_dir, settings.log_dir, settings.workspace_dir):
        try:
            device = path.stat().st_dev
            if device in seen:
                continue
            seen.add(device)
            free = shutil.disk_usage(path).free
        except OSError:
            continue  # the folder check already says why
        free_mib = free // MIB
        name = f"disk:{path}"
        if free < DISK_FAIL_BYTES:
            yield _fail(name, f"only {free_mib} MiB free under {path}: jobs and logs will fail", free=free)
        elif free < DISK_WARN_BYTES:
            yield _warn(name, f"only {free_mib} MiB free under {path} (under 1 GiB)", free=free)
        else:
            yield _ok(name, f"{free_mib} MiB free under {path}", free=free)


# -- scripts, repos, git ----------------------------------------------------------------------


def _program_problem(program: str) -> str | None:
    if "/" in program:
        p = Path(program)
        if not p.exists():
            return f"program {program} does not exist"
        if not p.is_file():
            return f"program {program} is not a file"
        if not os.access(p, os.X_OK):
            return f"program {program} is not executable (chmod +x)"
        return None
    return None if shutil.which(program) else f"program {program!r} is not on PATH"


def _scripts(settings: Settings, catalog: Catalog) -> Iterator[Check]:
    for key, script in catalog.scripts.items():
        name = f"script:{key}"
        program = script.command[0] if script.command else ""
        builtin = key in BUILTIN_SCRIPTS and key not in settings.scripts
        if PLACEHOLDER.fullmatch(program):
            yield _warn(name, f"script {key}: program is a placeholder {program}, not checked")
        elif "/" in program and not Path(program).is_absolute():
            # Jobs resolve it in their workspace (their working directory), not where doctor runs:
            # checked here it would pass or fail for the wrong file.
            yield _warn(
                name, f"script {key}: program {program} is resolved in each job's workspace, not checked"
            )
        elif problem := _program_problem(program):
            if builtin:
                yield _warn(name, f"built-in script {key}: {problem}; install it to use this script")
            else:
                yield _fail(name, f"script {key}: {problem}", program=program)
        else:
            yield _ok(name, f"script {key}: program {program} found")
        if _is_dangerous(script):
            yield _warn(
                f"script_policy:{key}",
                f"script {key} runs codex with {DANGEROUS_FLAG} (or --yolo): no sandbox, no approvals",
                production=settings.production,
            )


def _codex_version(catalog: Catalog) -> Iterator[Check]:
    """The codex that the built-in `codex.exec` runs, against the version this runner is built and
    tested for: another one may have other flags, events and config.toml keys, and its jobs fail in
    ways no test has seen. Nothing to say without a codex `codex.exec`, or when `script:codex.exec`
    already says its program is missing or not checked."""
    script = catalog.scripts.get("codex.exec")
    if script is None or not is_codex_exec(script):
        return
    program = script.command[0]
    if PLACEHOLDER.fullmatch(program) or ("/" in program and not Path(program).is_absolute()):
        return
    codex = codex_version.resolve(program)
    if codex is None:
        return
    expected = codex_version.CODEX_VERSION
    try:
        found = codex_version.installed_version(codex)
    except codex_version.VersionUnreadable as exc:
        yield _warn(
            "codex_version",
            f"codex at {codex} does not run ({exc}): codex.exec jobs will fail; reinstall codex "
            f"{expected} (`make codex`)",
            path=codex,
            expected=expected,
        )
        return
    if found != expected:
        yield _warn(
            "codex_version",
            f"codex at {codex} is {found}, but this runner is built and tested for {expected}: its "
            f"flags, events and config keys may differ; install {expected} (`make codex`)",
            path=codex,
            found=found,
            expected=expected,
        )
        return
    yield _ok("codex_version", f"codex at {codex} is {found}", path=codex, found=found, expected=expected)


def _is_dangerous(script: ScriptSpec) -> bool:
    flags = {*script.command, *(a.flag for a in script.args.values())}
    return bool(flags & BYPASS_FLAGS)


def _is_git_repo(path: Path) -> bool:
    # Work tree (.git folder, or file for worktrees and submodules) or bare repository.
    return (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "objects").is_dir())


def _repos(settings: Settings, catalog: Catalog) -> Iterator[Check]:
    for repo in catalog.repos.values():
        if not repo.enabled:
            continue
        yield _repo(catalog, repo)
        if repo.risk_policy == "permissive":
            yield _warn(
                f"repo_policy:{repo.name}",
                f'repo {repo.name} has risk_policy "permissive"',
                production=settings.production,
            )


def _repo(catalog: Catalog, repo: RepoSpec) -> Check:
    name = f"repo:{repo.name}"
    try:
        catalog.check_allowed(repo)
    except RunnerError as exc:
        return _fail(name, exc.message)
    if repo.source_type != "local_path":
        return _ok(name, f"repo {repo.name}: {repo.public_url()} is allowed (not fetched by doctor)")
    path = Path(repo.source)
    if not path.is_dir():
        return _fail(name, f"repo {repo.name}: {path} does not exist or is not a folder", path=str(path))
    if not _is_git_repo(path):
        return _fail(name, f"repo {repo.name}: {path} is not a git repository", path=str(path))
    return _ok(name, f"repo {repo.name}: {path} is a git repository", path=str(path))


def _git() -> Check:
    git = shutil.which("git")
    if git is None:
        return _fail("git", "git is not installed (not on PATH): every workspace needs it")
    try:
        done = subprocess.run([git, "--version"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return _fail("git", f"git at {git} does not run: {exc}")
    return _ok("git", done.stdout.strip() or "git found")


def _reaper() -> Check:
    """The runner waits for its own children only. As PID 1 (a container without an init, and
    RUNNER_NO_INIT=1 so that `pid1` did not fork an init), the processes a job orphans are
    re-parented to it and, once dead, never reaped: zombies pile up."""
    if os.getpid() != 1:
        return _ok("init", "not PID 1: orphaned processes are reaped by an init")
    if os.environ.get("RUNNER_NO_INIT") != "1":
        # `doctor` itself runs as PID 1 here; `serve` and `worker` would fork an init first.
        return _ok("init", "PID 1: serve and worker run under the runner's own init (RUNNER_NO_INIT unset)")
    return _warn(
        "init",
        "running as PID 1 (RUNNER_NO_INIT=1): processes that jobs orphan are never reaped and pile "
        "up as zombies; unset RUNNER_NO_INIT or run under an init that reaps (tini, `docker run --init`)",
    )


def _runs_as_root() -> Check:
    """Jobs run as the runner's user. As root, every job (a script, a command the model runs) is
    root too, with CAP_SYS_PTRACE among its capabilities: it reads the runner's memory and
    environment however the runner seals itself (ops/hardening.py), and anything else on the host.
    A warning, never a refusal: containers commonly run as root."""
    if os.geteuid() != 0:
        return _ok("runs_as_root", f"runs as uid {os.geteuid()}, not root")
    return _warn(
        "runs_as_root",
        "running as root: every job runs as root too and can read the runner's secrets from its "
        "memory (CAP_SYS_PTRACE), other jobs' environments and anything on the host; run the runner as a user of its own "
        "(systemd User=, docker --user, USER in the image)",
    )


def _fd_limit(settings: Settings) -> Check:
    """A cap on connections above the open-file limit bounds nothing: a flood of connections would
    still take the descriptors that jobs, logs and the database need (ops/fdlimit.py)."""
    limit = fdlimit.current(settings)
    cap = settings.http_max_connections
    if not limit.room:
        return _warn(
            "fd_limit",
            f"RUNNER_HTTP_MAX_CONNECTIONS={cap} needs about {limit.needed} open files (with jobs, "
            f"database and logs), but the hard limit is {limit.hard}: lower the cap or raise the "
            "limit (ulimit -n, LimitNOFILE= of systemd, --ulimit nofile= of docker)",
            soft=limit.soft,
            hard=limit.hard,
            needed=limit.needed,
        )
    return _ok(
        "fd_limit",
        f"open-file limit leaves room for {cap} HTTP connections (needs about {limit.needed})",
        soft=limit.soft,
        hard=limit.hard,
        needed=limit.needed,
    )


def _job_isolation(settings: Settings) -> Check:
    """Whether jobs are kept out of the runner's files (execution/sandbox.py): tried for real, in
    a throwaway thread, since a kernel can report Landlock and still refuse it (a seccomp filter)."""
    mode = settings.job_isolation
    exposed = "jobs can read the runner's files (database, other jobs' logs and workspaces)"
    if mode == "off":
        return _warn("job_isolation", f"RUNNER_JOB_ISOLATION=off: {exposed}")  # the operator's choice
    abi = sandbox.abi_version()
    try:
        if abi == 0:
            raise sandbox.ConfinementFailed(sandbox.refusal())
        sandbox.run_confined(sandbox.JobAccess(sandbox.hidden_paths(settings)), abi, lambda: None)
    except sandbox.ConfinementFailed as exc:
        if mode == "required":
            return _fail("job_isolation", f"{exc.message}: RUNNER_JOB_ISOLATION=required fails every job")
        return _warn("job_isolation", f"{exc.message}: {exposed}", production=settings.production)
    return _ok("job_isolation", f"jobs are confined with Landlock (ABI {abi})", abi=abi)


# What bubblewrap does first in codex's sandbox: a user namespace with a mount namespace in it, then
# `/` made a slave mount. In a child of its own: a process with threads (the runner) may not
# unshare a user namespace. CLONE_NEWUSER | CLONE_NEWNS; MS_SLAVE | MS_REC.
_USERNS_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x00020000) != 0:
    sys.exit("creating a user namespace fails: " + os.strerror(ctypes.get_errno()))
if libc.mount(None, b"/", None, 0x80000 | 0x4000, None) != 0:
    sys.exit("mounting in a new user namespace fails: " + os.strerror(ctypes.get_errno()))
"""


def _codex_sandbox(catalog: Catalog) -> Iterator[Check]:
    """codex runs the model's commands in bubblewrap (every repo but a `permissive` one), which
    needs a user namespace whoever runs it: root can make one wherever the kernel has them, a
    runner of its own user only where the kernel lets unprivileged users (docs/operations.md,
    "Running as a user of its own"). Without, codex.exec jobs run but every command the model
    asks for fails. Tried for real, in a throwaway child; nothing to say without a codex to run."""
    sandboxed = any(r.enabled and r.risk_policy != "permissive" for r in catalog.repos.values())
    codex = [s for s in catalog.scripts.values() if is_codex_exec(s) and not _is_dangerous(s)]
    if not sandboxed or not any(codex_version.resolve(s.command[0]) for s in codex):
        return
    name = "codex_sandbox"
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _USERNS_PROBE], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as exc:
        yield _warn(name, f"could not check codex's sandbox: {exc}")
        return
    if done.returncode != 0:
        problem = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:200]
        yield _warn(
            name,
            f"codex's sandbox (bubblewrap) cannot start here: {problem}; every command the model runs "
            "fails. Allow user namespaces (user.max_user_namespaces > 0; for a runner not run as "
            "root: kernel.unprivileged_userns_clone=1, or on Ubuntu an AppArmor profile for bwrap)",
        )
        return
    yield _ok(name, "codex's sandbox can make its namespaces (bubblewrap)")


def _spare_watch(settings: Settings, catalog: Catalog) -> Check:
    """Warm workspaces of big trees are taken without a file-by-file check only when this process can
    watch them (inotify; docs/git.md). Without it they still work, just slower: a warning."""
    name = "spare_watch"
    wanted = [r for r in catalog.repos.values() if r.enabled and r.workspace in ("clone", "worktree")]
    if settings.warm_workspaces <= 0 or not wanted:
        return _ok(name, "no warm workspaces to watch")
    if not spare_watch.available():
        return _warn(
            name,
            "inotify is not available here (fs.inotify.max_user_instances reached, or a sandbox without "
            "it): warm workspaces are checked file by file when taken, 50-100 ms more per job on a big repo",
        )
    return _ok(name, "warm workspaces can be watched (inotify)")


# -- secrets and unsafe settings --------------------------------------------------------------


def _encryption(settings: Settings, engine: Engine | None) -> Iterator[Check]:
    name = "encryption_key"
    stored: list[Any] = []
    if engine is not None:
        with engine.connect() as conn:
            # Every one (a handful): after a key change without `credentials rotate`, the first
            # may decrypt and another not.
            stored = list(
                conn.execute(
                    sa.select(credentials.c.name, credentials.c.secret_enc).order_by(credentials.c.name)
                )
            )
    count = len(stored)
    if not settings.encryption_key:
        if count:
            yield _warn(
                name,
                f"{count} stored credential(s) but RUNNER_ENCRYPTION_KEY is not set: jobs that need them fail",
                production=settings.production,
            )
        elif settings.production:
            yield _fail(
                name, "RUNNER_ENCRYPTION_KEY is not set (required in production; `codex-runner keygen`)"
            )
        else:
            yield _ok(name, "RUNNER_ENCRYPTION_KEY not set; no credentials stored")
        return
    try:
        keys = [secrets.parse_key(settings.encryption_key)]
        if settings.encryption_key_previous:
            keys.append(secrets.parse_key(settings.encryption_key_previous))
    except RunnerError:
        yield _fail(
            name, "RUNNER_ENCRYPTION_KEY (or _PREVIOUS) does not parse: expected 64 hex chars or base64"
        )
        return
    bad = []
    for row in stored:
        try:
            secrets.decrypt(keys, row.secret_enc, row.name.encode())
        except RunnerError:
            bad.append(row.name)
    if bad:
        shown = ", ".join(repr(n) for n in bad[:5]) + (" …" if len(bad) > 5 else "")
        yield _fail(
            name,
            f"RUNNER_ENCRYPTION_KEY does not decrypt stored credential(s) {shown}: wrong key, or a key "
            "changed without `codex-runner credentials rotate`?",
        )
        return
    yield _ok(name, f"RUNNER_ENCRYPTION_KEY parses ({count} credential(s) stored)")


def _repo_credentials(catalog: Catalog, engine: Engine | None) -> Iterator[Check]:
    """An enabled repo naming a credential nobody stored (a typo, a `credentials delete`): every
    job on it fails its prepare. A warning, as the other repos' jobs run."""
    named = {r.name: r.credential for r in catalog.repos.values() if r.enabled and r.credential}
    if engine is None or not named:
        return
    with engine.connect() as conn:
        stored = set(conn.execute(sa.select(credentials.c.name)).scalars())
    for repo, credential in sorted(named.items()):
        if credential not in stored:
            yield _warn(
                f"credential:{repo}",
                f"repo {repo} names credential {credential!r}, which is not stored: its jobs fail "
                f"their prepare; store it with `codex-runner credentials set {credential} --host HOST`",
            )


_SECRET_SETTINGS = ("encryption_key_previous", "jwt_secret", "token")
#: An HS256 key shorter than the hash is weaker than the hash (RFC 7518 §3.2).
MIN_JWT_SECRET_BYTES = 32


def _secrets(settings: Settings) -> Iterator[Check]:
    short = [
        f"RUNNER_{n.upper()}" for n in _SECRET_SETTINGS if 0 < len(getattr(settings, n) or "") < MIN_MASKABLE
    ]
    if short:
        yield _warn(
            "short_secrets",
            f"{', '.join(short)} shorter than {MIN_MASKABLE} characters: cannot be masked in logs",
        )


def _unsafe_settings(settings: Settings) -> Iterator[Check]:
    prod = settings.production
    try:
        mode = stat.S_IMODE(settings.data_dir.stat().st_mode)
    except OSError:
        mode = None
    if mode is not None and mode & 0o077:
        yield _warn(
            "data_dir_permissions",
            f"data folder {settings.data_dir} is open to group/others (mode {mode:o}): chmod 700 it",
            production=prod,
        )
    # The runner's own CODEX_HOME keeps codex's login (auth.json) and every conversation
    # (sessions/): as private as the data folder. One passed through from CODEX_HOME is its owner's.
    home = settings.codex_home or (None if os.environ.get("CODEX_HOME") else settings.data_dir / "codex-home")
    try:
        home_mode = None if home is None else stat.S_IMODE(home.stat().st_mode)
    except OSError:
        home_mode = None  # not created yet: prepare_codex_home makes it 0700
    if home is not None and home_mode is not None and home_mode & 0o077:
        yield _warn(
            "codex_home_permissions",
            f"codex home {home} is open to group/others (mode {home_mode:o}): chmod 700 it",
            production=prod,
        )
    if not is_loopback_host(settings.host) and not settings.allow_remote:
        yield _warn(
            "bind_address",
            f"RUNNER_HOST={settings.host} is not loopback: set RUNNER_ALLOW_REMOTE=true if intended",
            production=prod,
        )
    if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
        # Whoever holds one token (or guesses the key from it offline) can sign others, for any
        # user and with `role: admin`.
        yield _warn(
            "jwt_secret",
            f"RUNNER_JWT_SECRET is {len(settings.jwt_secret.encode())} bytes: an HS256 key needs at least "
            f"{MIN_JWT_SECRET_BYTES} random bytes (RFC 7518 §3.2), e.g. `openssl rand -base64 32`",
            production=prod,
        )
    if settings.redis_url is not None:
        yield _warn(
            "redis_ingress",
            "RUNNER_REDIS_URL is set, but this version has no Redis Streams ingress (SPEC §10): "
            "jobs added to the stream are never run; submit them over the HTTP API",
            production=prod,
        )


def _backup(settings: Settings) -> Check:
    newest = newest_backup(settings.backup_dir)
    limit = settings.backup_max_age_days
    if newest is None:
        return _warn(
            "backup",
            f"no backup in {settings.backup_dir}: run `codex-runner backup`",
            production=settings.production,
        )
    when, path = newest
    age_days = (utcnow() - when).total_seconds() / 86400
    detail = {"path": str(path), "age_days": round(age_days, 2)}
    # The age is read from the name: an empty file, or one named for a later time, is no backup.
    try:
        empty = path.stat().st_size == 0
    except OSError:
        empty = True
    if empty or age_days < -1 / 24:
        problem = "is empty" if empty else "is dated in the future"
        return _warn(
            "backup",
            f"newest backup {path.name} {problem}: run `codex-runner backup`",
            production=settings.production,
            **detail,
        )
    if age_days > limit:
        return _warn(
            "backup",
            f"newest backup {path.name} is {age_days:.1f} days old (RUNNER_BACKUP_MAX_AGE_DAYS={limit})",
            production=settings.production,
            **detail,
        )
    return _ok("backup", f"newest backup {path.name} is {age_days:.1f} days old", **detail)


# -- start-up ---------------------------------------------------------------------------------


def startup(runtime: Runtime) -> list[Check]:
    """Runs the checks at `serve` start-up, keeps them for `/readyz` and diagnostics, logs the
    problems, and refuses to start on a blocking one only in production mode (a dev machine starts
    with a warning, and `/readyz` says 503)."""
    checks = run_checks(runtime.settings, runtime.catalog, runtime.engine)
    runtime.startup_checks[:] = [c.to_dict() for c in checks]
    for c in checks:
        if not c.ok:
            emit = log.error if c.blocking else log.warning
            emit("startup_check", check=c.name, level=c.level, detail=c.message)
    failed = blocking_failures(checks)
    log.info("startup_checks_done", total=len(checks), failed=len(failed), warnings=_warnings(checks))
    if failed and runtime.settings.production:
        raise ConfigError(
            f"start-up checks failed: {'; '.join(c.message for c in failed)} (see `codex-runner doctor`)"
        )
    return checks


def _warnings(checks: Iterable[Check]) -> int:
    return sum(1 for c in checks if not c.ok and not c.blocking)
