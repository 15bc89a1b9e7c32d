"""Keeps a job's processes out of the runner's own files, with Linux's Landlock.

A job runs as the runner's user, so without this it can read everything the runner can: the
SQLite database (every job's arguments and prompts), other jobs' logs, workspaces and run
folders, the stored admin token of the demo, the audit log, backups, and CODEX_HOME's
`auth.json`. codex's own sandbox limits writes, not reads, and a plain script has none at all.

Landlock (Linux 5.13+) lets an unprivileged thread give up file-system access for itself and every
process it starts, for good, with no root and no helper binary. A ruleset only allows: every
right it handles is denied but where a rule grants it. So "everything but the runner's files" is
written as a rule for every entry of every folder on the way to a hidden path (`/`, `/var`,
`/var/lib`, …) except the next folder on that way, plus rules for what the job may use inside
hidden folders (its workspace, its repository's git folder, the codex home of a codex job).
Consequences, documented in docs/execution.md: a job cannot list or create entries directly in
the folders on the way to a hidden path (`ls /` fails; `/tmp` too when the data folder is under
it). The plan of those folders is read again whenever one of them changes (its mtime).

The rules are applied in a thread of its own that then starts the job's leader and ends: Landlock
(like `no_new_privs`, which it needs) restricts the calling thread only, and a `preexec_fn` would
make every spawn fork instead of vfork (docs/performance.md). Landlock's domain also keeps the
job's processes from attaching to processes outside it (`ptrace`, `/proc/<pid>/mem`, `fd/`) and
from reading their `/proc/<pid>/environ` — the runner's own `git` and other jobs' processes — and,
where the kernel has its ABI 6, from signalling them. The environment is refused only to a job of
an ordinary user: a job of a runner that runs as root reads any process's (Linux 6.18).

Written by hand over `ctypes`: there is no maintained Python binding of the three system calls.
"""

from __future__ import annotations

import _thread
import ctypes
import functools
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from codex_runner.errors import RunnerError

if TYPE_CHECKING:
    from codex_runner.config import Settings

log = structlog.get_logger("codex_runner.execution")

# The same numbers on every architecture Linux added them for (the generic system-call table).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Access rights (include/uapi/linux/landlock.h), by the ABI version that added them.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
_ABI1 = (1 << 13) - 1  # EXECUTE … MAKE_SYM
REFER = 1 << 13  # ABI 2: renames and links across folders (denied everywhere unless handled)
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
# Scopes (ABI 6): no connecting to an abstract unix socket, and no signal, outside the domain.
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1
_SCOPES = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
#: The rights a rule on a file (not a folder) may carry.
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
#: What a clone's borrowed object store needs: reading.
READ_ONLY = READ_FILE | READ_DIR


class ConfinementFailed(RunnerError):
    """The job's leader could not be confined (no Landlock, or the kernel refused a step); the
    message says why in one line."""

    code = "spawn_failed"


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    result = int(_libc().syscall(number, *args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


@functools.cache
def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where there is none (an older kernel, Landlock not
    enabled at boot, a seccomp filter that refuses the call, not Linux)."""
    try:
        return _syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    except (OSError, AttributeError):
        return 0


def handled_rights(abi: int) -> int:
    rights = _ABI1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


@dataclass(frozen=True)
class JobAccess:
    """What one job's processes may reach. `hidden`: paths out of reach with all they hold;
    `granted`: (path, rights) inside them that the job may still use; `rights` 0 means all."""

    hidden: tuple[str, ...]
    granted: tuple[tuple[str, int], ...] = ()


def hidden_paths(settings: Settings) -> tuple[str, ...]:
    """The runner's own files: its data folder and whatever of its files a setting put elsewhere
    (logs, workspaces, backups, audit log, codex home, a SQLite database, its config file), plus
    RUNNER_JOB_HIDDEN_PATHS. Real paths, none inside another."""
    paths: list[Path] = [
        settings.data_dir,
        settings.log_dir,
        settings.workspace_dir,
        settings.backup_dir,
        *(p for p in (settings.audit_log, settings.codex_home, settings.config) if p is not None),
        *(Path(p) for p in settings.job_hidden_paths),
    ]
    if settings.is_sqlite:
        database = settings.database_url.split("///", 1)[-1].split("?", 1)[0]
        if database:
            paths += [Path(database + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
    return _outermost_real(tuple(paths))


@functools.lru_cache(maxsize=16)  # one set per settings in use: every spawn asks
def _outermost_real(paths: tuple[Path, ...]) -> tuple[str, ...]:
    # Paths that do not exist yet are hidden too: once made, they are out of reach as well.
    real = {os.path.realpath(p) for p in paths}
    return tuple(sorted(p for p in real if not any(_under(p, q) for q in real if q != p)))


def job_access(
    settings: Settings,
    workspace: Path,
    *,
    store: Path | None = None,
    store_rights: int = 0,
    codex_home: Path | None = None,
    job_id: str | None = None,
) -> JobAccess:
    """One job's access: the runner's files hidden, but its workspace, the git folder its
    workspace uses (`store`: a worktree's whole repository, a clone's borrowed objects read-only)
    and, for a codex job, the codex home."""
    hidden = hidden_paths(settings)
    # No grant inside the runner's own areas but the job's own workspace: an in_place repo (or a
    # local repo's git folder) that a link made to lead into them — another job's workspace, the
    # logs — must not open them to this job. (A repo the operator keeps in the data folder, as
    # the demo does, is not in those areas.)
    root = os.path.realpath(settings.workspace_dir)
    areas = [root, *(os.path.realpath(p) for p in (settings.log_dir, settings.runs_dir, settings.backup_dir))]
    own = os.path.join(root, job_id) if job_id else None
    real = os.path.realpath(workspace)
    _check_grant(real, areas, own, "workspace")
    granted: list[tuple[str, int]] = [(real, 0)]
    if store is not None:
        real_store = os.path.realpath(store)
        _check_grant(real_store, areas, None, "repository")
        granted.append((real_store, store_rights))
    shown: set[str] = set()
    if codex_home is not None:
        home = os.path.realpath(codex_home)
        granted.append((home, 0))
        shown.add(home)  # the configured codex home, itself a hidden path, is not hidden from it
    return JobAccess(tuple(h for h in hidden if h not in shown), tuple(granted))


def _check_grant(path: str, areas: Iterable[str], own: str | None, what: str) -> None:
    """Refuses a grant of a path inside one of the runner's own `areas`, but `own`."""
    if path == own:
        return
    for area in areas:
        if _under(path, area):
            raise ConfinementFailed(f"the job's {what} {path} lies in the runner's own files")


def _under(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (both real, absolute)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass
class _Plan:
    rules: tuple[tuple[str, int], ...]
    #: (st_ino, st_mtime_ns) of every folder on the way when it was read: an entry added, removed
    #: or renamed in one changes its mtime, and the plan is read again.
    folders: tuple[tuple[str, int, int], ...]
    #: The rules as the kernel takes them, each with an `O_PATH` descriptor of its path, opened at
    #: the plan's first use and kept until it is replaced: an open, a stat and a close per rule
    #: and spawn cost three times the rule itself. None while not opened, or for a plan of more
    #: than `MAX_KEPT_RULES` rules (opened at each use then).
    attrs: list[_PathBeneathAttr] | None = None
    #: `ctypes.byref` of each of `attrs`, made once: the rules are added in a tight loop.
    refs: list[object] = field(default_factory=list)

    #: Rules on mount points and files, opened at each use instead: a descriptor kept on a mount
    #: point would keep the operator from unmounting it ("target is busy") for as long as the
    #: plan lives.
    mounts: list[tuple[str, int]] = field(default_factory=list)

    def open(self) -> None:
        """Opens the descriptors of a plan of at most `MAX_KEPT_RULES` rules; a bigger one stays
        unopened (`attrs` None), its rules opened at each use."""
        if len(self.rules) > MAX_KEPT_RULES:
            return
        self.attrs, self.mounts = [], []
        devices: dict[str, int] = {}
        for path, rights in self.rules:
            attr = _rule_attr(path, rights)
            if attr is None:
                continue
            folder = os.path.dirname(path)
            if folder not in devices:
                try:
                    devices[folder] = os.stat(folder).st_dev
                except OSError:
                    devices[folder] = -1  # gone: every entry of it is opened at each use
            st = os.fstat(attr.parent_fd)
            if st.st_dev != devices[folder] or not stat.S_ISDIR(st.st_mode):
                # A file is opened at each use too: a descriptor kept on one deleted meanwhile
                # would keep its space taken until the plan is next read.
                os.close(attr.parent_fd)
                self.mounts.append((path, rights))
            else:
                self.attrs.append(attr)
        self.refs = [ctypes.byref(a) for a in self.attrs]

    def close(self) -> None:
        for attr in self.attrs or ():
            os.close(attr.parent_fd)
        self.attrs = None
        self.refs = []
        self.mounts = []


#: Descriptors one plan may keep open (a folder on the way with thousands of entries, as a test
#: run's temporary folder, would otherwise take the process's open-file limit).
MAX_KEPT_RULES = 256
#: Plans kept at once, one per hidden set in use (tests make many): past it all are dropped.
MAX_PLANS = 8
#: The most rule descriptors the plans keep open at once, for the open-file budget (ops/fdlimit.py).
MAX_KEPT_DESCRIPTORS = MAX_PLANS * MAX_KEPT_RULES

_plans: dict[tuple[tuple[str, ...], int], _Plan] = {}
#: Held while a plan is read, used or replaced: its descriptors are closed only under it.
_plans_lock = threading.Lock()


def _folder_marks(folders: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
    marks = []
    for folder in folders:
        try:
            st = os.stat(folder)
        except OSError:
            marks.append((folder, 0, 0))
        else:
            marks.append((folder, st.st_ino, st.st_mtime_ns))
    return tuple(marks)


def _on_the_way(hidden: Iterable[str]) -> list[str]:
    folders: set[str] = set()
    for path in hidden:
        parent = os.path.dirname(path)
        while True:
            folders.add(parent)
            if parent == "/":
                break
            parent = os.path.dirname(parent)
    return sorted(folders)


def _plan(hidden: tuple[str, ...], full: int) -> _Plan:
    """The rules that grant everything outside `hidden`: each entry of each folder on the way to
    a hidden path but the next folder on that way. A symbolic link is followed: one that leads
    into a hidden path, or onto the way to one, gets no rule (its target would be granted).
    Kept while no folder on the way changes (one stat each per spawn). Call under `_plans_lock`."""
    folders = _on_the_way(hidden)
    marks = _folder_marks(folders)
    cached = _plans.get((hidden, full))
    if cached is not None and cached.folders == marks:
        return cached
    on_the_way = set(folders)
    rules: list[tuple[str, int]] = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            path = entry.path
            if path in on_the_way or path in hidden:
                continue
            target = os.path.realpath(path) if entry.is_symlink() else path
            if target in on_the_way or any(_under(target, h) for h in hidden):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            # The target, opened without following links (`_rule_attr`): a link swapped in
            # after this plan was read gets a rule on the link itself, which grants nothing.
            rules.append((target, full if is_dir else full & _FILE_RIGHTS))
    plan = _Plan(tuple(rules), marks)
    if cached is not None:
        cached.close()
    if len(_plans) >= MAX_PLANS and (hidden, full) not in _plans:
        for old in _plans.values():
            old.close()
        _plans.clear()
    _plans[(hidden, full)] = plan
    return plan


def _rule_attr(path: str, rights: int) -> _PathBeneathAttr | None:
    """The kernel's form of one rule, with an `O_PATH` descriptor the caller closes; None when
    the path is gone (nothing to grant)."""
    try:
        # Real paths only (`_plan`, `job_access`): a symbolic link there now was not one when
        # the path was checked, and must not lead the rule elsewhere.
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS  # a folder's rights on a file: EINVAL
    except OSError:
        os.close(fd)
        return None
    return _PathBeneathAttr(rights, fd)


@functools.cache
def _add_rule_call() -> Any:
    """libc's `syscall`, typed for `landlock_add_rule` (a function object of its own, so that the
    other calls keep theirs untyped): ctypes then converts no argument by guessing."""
    call = ctypes.CDLL(None, use_errno=True).syscall
    call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
    call.restype = ctypes.c_long
    return call


def _add(ruleset: int, attr: _PathBeneathAttr) -> None:
    _syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(attr), 0)


def _add_rules(ruleset: int, rules: Iterable[tuple[str, int]]) -> None:
    for path, rights in rules:
        attr = _rule_attr(path, rights)
        if attr is not None:
            try:
                _add(ruleset, attr)
            finally:
                os.close(attr.parent_fd)


def build_ruleset(access: JobAccess, abi: int) -> int:
    """A ruleset's descriptor (the caller closes it) that grants everything but `access.hidden`,
    and `access.granted` inside it."""
    full = handled_rights(abi)
    # Abstract unix sockets have no file for a rule to cover: without their scope a job connects
    # to any listener of the network namespace (another job's server, a container shim's).
    attr = _RulesetAttr(full, 0, _SCOPES if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 8  # older kernels refuse unknown fields
    ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    try:
        with _plans_lock:
            plan = _plan(access.hidden, full)
            if plan.attrs is None:
                plan.open()
            if plan.attrs is None:
                _add_rules(ruleset, plan.rules)
            else:
                add = _add_rule_call()
                for ref in plan.refs:
                    if add(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ref, 0) < 0:
                        code = ctypes.get_errno()
                        raise OSError(code, os.strerror(code))
                _add_rules(ruleset, plan.mounts)
        granted = [(p, full if r == 0 else r & full) for p, r in access.granted]
        _add_rules(ruleset, _safe_grants(granted, access.hidden))
    except BaseException:
        os.close(ruleset)
        raise
    return ruleset


def _safe_grants(granted: Sequence[tuple[str, int]], hidden: Sequence[str]) -> list[tuple[str, int]]:
    """A granted folder that holds a hidden path cannot be granted whole (a rule covers all that
    lies beneath it): its entries are granted by the plan already, when it lies outside the
    hidden paths."""
    out = []
    for path, rights in granted:
        real = os.path.realpath(path)
        if any(_under(h, real) and h != real for h in hidden):
            continue
        out.append((real, rights))
    return out


T = TypeVar("T")


class Domain:
    """The thread that confined a job's leader, kept in the job's Landlock domain until `close`,
    to kill what the domain still holds (`kill_all`).

    A process can leave the job's group and session, drop `RUNNER_JOB_ID` from its environment,
    leave the workspace and name nothing of it in its arguments (`setsid env -i sh -c 'cd /; …'`):
    nothing the runner reads in /proc tells it is the job's. It cannot leave the job's domain,
    though, and with the signal scope (ABI 6) a process in the domain may signal only processes in
    it: `kill(-1, SIGKILL)` sent from inside kills exactly the job's processes (the kernel spares
    the sender's own process, the runner). One idle thread per running job; `kill_all` costs a
    hand-off and one system call."""

    def __init__(self) -> None:
        self._request = _thread.allocate_lock()
        self._request.acquire()
        self._reply = _thread.allocate_lock()
        self._reply.acquire()
        #: Set by the confined thread once the leader started in a domain with the signal scope.
        self.serving = False
        self._done = False  # kill_all or close was called: the thread's one request is made
        self._kill = False
        self._killed = False

    def _serve(self) -> None:
        # One request, then the thread ends: a kill (waited for) or a close (not).
        self._request.acquire()
        if self._kill:
            self._killed = _kill_domain()
            self._reply.release()

    def kill_all(self) -> bool:
        """SIGKILLs every process left in the job's domain, and ends the thread; whether any was
        signalled (a zombie counts). False, and nothing signalled, when the leader was not started
        in such a domain or the domain is closed."""
        if not self.serving or self._done:
            return False
        self._done = self._kill = True
        self._request.release()
        self._reply.acquire()
        return self._killed

    def close(self) -> None:
        """Ends the thread without a kill, and without waiting for it. Idempotent."""
        if self.serving and not self._done:
            self._done = True
            self._request.release()


def _kill_domain() -> bool:
    """From inside a job's domain: SIGKILL every process it may signal, which the signal scope
    makes the domain's. Signals nothing if init answers: the scope is then not in force, and
    `kill(-1)` would reach every process of the runner's user (of the machine, as root)."""
    try:
        os.kill(1, 0)
    except PermissionError:
        pass
    except OSError:
        return False
    else:
        return False
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:  # ESRCH: nothing left
        return False
    return True


def run_confined(access: JobAccess, abi: int, start: Callable[[], T], domain: Domain | None = None) -> T:
    """Calls `start` (which spawns the job's leader) in a new thread that first confines itself to
    `access`; the leader and all it starts inherit that. Raises `ConfinementFailed` when the
    kernel refuses, and whatever `start` raises. With `domain`, where the kernel scopes signals
    (ABI 6), the thread then stays, serving it, until `domain.close()`."""
    result: list[T] = []
    failure: list[BaseException] = []

    def confined() -> None:
        try:
            try:
                ruleset = build_ruleset(access, abi)
                try:
                    # Required unless the thread has CAP_SYS_ADMIN; also keeps a set-user-ID
                    # program the job runs from gaining privileges, which no job should need.
                    _prctl_no_new_privs()
                    _syscall(_SYS_RESTRICT_SELF, ruleset, 0)
                finally:
                    os.close(ruleset)
            except OSError as exc:
                raise ConfinementFailed(refusal(exc)) from None
            result.append(start())
            if domain is not None and abi >= 6:
                domain.serving = True
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    # A bare `_thread` thread: `threading.Thread`'s bookkeeping (its name, its registry, the events
    # of start() and join()) cost as much as the rest of the spawn's Python.
    done = _thread.allocate_lock()
    done.acquire()

    def run() -> None:
        try:
            confined()
        finally:
            done.release()
        if domain is not None and domain.serving:
            domain._serve()

    _thread.start_new_thread(run, ())
    done.acquire()
    if failure:
        raise failure[0]
    return result[0]


def _prctl_no_new_privs() -> None:
    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def refusal(exc: OSError | None = None) -> str:
    """One line: why a job cannot be confined."""
    why = os.strerror(exc.errno) if exc is not None and exc.errno else "this kernel has no Landlock"
    return f"cannot confine the job's processes (Landlock): {why}"
