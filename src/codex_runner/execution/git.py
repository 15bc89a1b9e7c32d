"""Running git safely: one helper with a fixed environment, a one-shot credential helper, and the
validation of ref names and repo sources (SPEC §6, §7).

Every git command of the runner goes through `run_git`. It never inherits the service's environment:
no system or user configuration, no hooks, no terminal prompts, only the transports we allow, and a
`HOME` that belongs to the job. A credential reaches git only through the environment of the one
command that needs it and a helper script that answers for one host; it is never in an argument list
or a configuration file, and error messages are masked before they leave this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from codex_runner.errors import RunnerError
from codex_runner.execution.pipewait import fifo_wait
from codex_runner.secrets import mask, utf8_tail

GIT_ERROR_CODES = frozenset(
    {"clone_failed", "branch_failed", "commit_failed", "push_failed", "prepare_failed", "cleanup_failed"}
)
STDERR_TAIL_BYTES = 8 * 1024  # the stage's stderr tail is at most 8 KiB (SPEC §3)
LOCAL_TIMEOUT = 600.0
#: How long a command that found the index locked is tried again (`run_git`).
LOCK_RETRY_SECONDS = 3.0
#: git's words (lockfile.c) when `index.lock` exists. Only the index's: a command that takes it
#: takes it before it changes anything (checkout, reset, commit, add), so trying again repeats
#: nothing (a recovery's `stash push`, which takes it again for its reset, could at worst be
#: stored twice: nothing is lost). A ref's lock can come later, after a first change (`checkout
#: -b` has made its branch when it finds HEAD.lock), and git waits for those itself
#: (core.filesRefLockTimeout).
_LOCK_BUSY = re.compile(rb"index\.lock'?: File exists\.")
NETWORK_TIMEOUT = 1800.0
#: How often a running git command is checked for a wait on a named pipe (`pipewait`): the
#: longest a command that opened one stalls before it fails.
FIFO_POLL_SECONDS = 0.5
# http is accepted only towards loopback (test servers, a git server on the same host): anywhere
# else a token would cross the network in clear.
SAFE_PROTOCOLS = ("file", "https", "ssh")
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})

_MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
# A new name whenever the protocol between the runner and its helper changes: a git HOME that
# outlived an upgrade (a spare's, a mirror's) keeps the script it was given.
_HELPER_NAME = "git-credential-runner-2"
# The helper answers `get` only, only for the credential's host, and only over https (or plain http
# when the command was allowed it: loopback). The user name and secret come from a memory file
# (memfd) the runner passes to this one git command as a descriptor, read through
# /proc/self/fd (which opens it again from its start, for a second `get`), never from the
# environment: `/proc/<pid>/environ` of git and its helpers is readable to every process of the
# runner's user, a job's among them (Landlock leaves read-mode access alone), while their `fd/`
# is not to a confined job. `printf` and `read` are shell built-ins, so the secret is never in a
# process's argument list either.
_HELPER_SCRIPT = """#!/bin/sh
# codex-runner one-shot git credential helper: the credential comes from a descriptor of the runner's.
test "$1" = get || exit 0
proto= host=
while IFS= read -r line && test -n "$line"; do
  case $line in
    protocol=*) proto=${line#protocol=} ;;
    host=*) host=${line#host=} ;;
  esac
done
case $proto in
  https) ;;
  http) test "$CODEX_RUNNER_GIT_PLAIN_HTTP" = 1 || exit 0 ;;
  *) exit 0 ;;
esac
test "$host" = "$CODEX_RUNNER_GIT_HOST" || test "${host%:*}" = "$CODEX_RUNNER_GIT_HOST" || exit 0
case $CODEX_RUNNER_GIT_CREDENTIAL_FD in ''|*[!0-9]*) exit 0 ;; esac
{ IFS= read -r user && IFS= read -r secret; } < "/proc/self/fd/$CODEX_RUNNER_GIT_CREDENTIAL_FD" || exit 0
printf 'username=%s\\npassword=%s\\n' "$user" "$secret"
"""

# Configuration every git command runs with, passed through GIT_CONFIG_COUNT (read after the
# repository's own config, so it wins over whatever a workspace's .git/config says).
_FIXED_CONFIG: tuple[tuple[str, str], ...] = (
    ("core.hooksPath", os.devnull),
    ("core.fsmonitor", "false"),
    # A fetch into a repository with alternates runs this through the shell to list their refs: a
    # repo config an agent could write (and alternates it could add) would name any program. Set,
    # it lists none; the fetch then negotiates with the repository's own refs only.
    ("core.alternateRefsCommand", "true"),
    # Attributes choose filter drivers (`gitutil.filter_guard` turns off the drivers themselves).
    ("core.attributesFile", os.devnull),
    ("protocol.ext.allow", "never"),
    ("credential.helper", ""),  # an empty value empties the helper list: no repo-configured helper runs
    ("http.sslVerify", "true"),
    ("gc.autoDetach", "false"),  # no background gc outliving the command (and the per-repo lock)
    ("fetch.recurseSubmodules", "false"),
    ("submodule.recurse", "false"),
    ("commit.gpgSign", "false"),
    ("tag.gpgSign", "false"),
    ("advice.detachedHead", "false"),
    ("init.defaultBranch", "main"),
    ("user.name", "codex-runner"),
    ("user.email", "codex-runner@localhost"),
)
# Passed through from the service's environment: where to find programs, proxies, CA bundles, and the
# ssh agent (ssh keys are the service account's; stored credentials are for https).
_PASS_THROUGH = (
    "PATH",
    "TMPDIR",
    "TZ",
    "SSH_AUTH_SOCK",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
    "GIT_EXEC_PATH",
)


@dataclass(frozen=True)
class GitCredential:
    """A decrypted credential for one host, in memory only. `repr` never shows the secret."""

    host: str
    username: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        # The credential protocol is line-based: a newline would let a value inject another key.
        for name in ("host", "username", "secret"):
            value = getattr(self, name)
            if not value or any(c in value for c in "\n\r\0"):
                raise GitError(f"credential {name} is empty or has a line break", code="prepare_failed")


class GitError(RunnerError):
    """A git stage failed. `message` is git's stderr tail with every secret masked."""

    code = "prepare_failed"

    def __init__(self, message: str, *, code: str | None = None, exit_code: int | None = None) -> None:
        if code is not None and code not in GIT_ERROR_CODES:
            raise ValueError(f"unknown git error code {code!r}")
        super().__init__(message, code=code)
        self.exit_code = exit_code


@dataclass(frozen=True)
class GitResult:
    returncode: int
    stdout: str
    stderr: str


def _false_program() -> str:
    return shutil.which("false") or "/bin/false"


#: The job whose work the git commands of this context do (set by `JobRun` for its task; worker
#: threads of `asyncio.to_thread` inherit it). Its commands carry `RUNNER_JOB_ID` like the job's
#: own processes, so whatever kills those by that variable finds them too: start-up recovery after a
#: crash mid-push, the watchdog that fails the job, the shutdown. Background work (spare refills,
#: upkeep) runs in plain threads, outside any job's context.
JOB_OF_GIT: contextvars.ContextVar[str | None] = contextvars.ContextVar("JOB_OF_GIT", default=None)
#: The job stage a git command runs for, when a cancel may kill it (prepare, commit, push): its
#: processes carry `RUNNER_GIT_STAGE`, so that the kill finds them and never the cleanup's git.
GIT_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("GIT_STAGE", default=None)


def git_env(
    home: Path,
    *,
    credential: GitCredential | None = None,
    plain_http: bool = False,
    env_extra: Mapping[str, str] | None = None,
    extra_config: Sequence[tuple[str, str]] = (),
) -> dict[str, str]:
    """The complete environment of one git command; nothing else of the service's leaks in.
    `extra_config`: more settings, after (so over) the fixed ones."""
    env = {name: os.environ[name] for name in _PASS_THROUGH if name in os.environ}
    env.setdefault("PATH", os.defpath)
    no = _false_program()
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "LC_ALL": "C",
            "LANG": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GCM_INTERACTIVE": "never",
            "GIT_ASKPASS": no,  # beats core.askPass: a missing credential fails at once
            "SSH_ASKPASS": no,
            "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",  # beats core.sshCommand from a repo's config
            "GIT_ALLOW_PROTOCOL": ":".join((*SAFE_PROTOCOLS, "http") if plain_http else SAFE_PROTOCOLS),
            # glibc gives memory back to the system whenever 128 KiB are free at the top of the heap,
            # and takes it again on the next allocation: `index-pack --fix-thin` of a 0.3 MB pack made
            # 741 brk calls and their page faults, 68 ms against 49 ms with this. git's commands are
            # short-lived; what they free returns to the system when they exit. Other C libraries
            # ignore the variable.
            "MALLOC_TRIM_THRESHOLD_": str(_MALLOC_TRIM_THRESHOLD),
        }
    )
    config = [*_FIXED_CONFIG, *extra_config]
    if credential is not None:
        helper = _install_helper(home)
        config.append(("credential.helper", "!" + shlex.quote(str(helper))))
        # The user name and secret come through `_credential_fd`, from `run_git`.
        env.update(
            {
                "CODEX_RUNNER_GIT_HOST": credential.host,
                "CODEX_RUNNER_GIT_PLAIN_HTTP": "1" if plain_http else "0",
            }
        )
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for i, (key, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    job_id = JOB_OF_GIT.get()
    if job_id is not None:
        env["RUNNER_JOB_ID"] = job_id
        stage = GIT_STAGE.get()
        if stage is not None:
            env["RUNNER_GIT_STAGE"] = stage
    if env_extra:
        env.update(env_extra)
    return env


def _install_helper(home: Path) -> Path:
    """Writes the (secret-free) helper script into the job's git HOME, once."""
    return install_script(home, _HELPER_NAME, _HELPER_SCRIPT)


def install_script(home: Path, name: str, text: str) -> Path:
    """Writes an executable script git is to run into a git HOME (private to one job or build), once;
    atomically, so a concurrent git never runs half a script."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    script = home / name
    if not script.exists():
        tmp = home / f".{name}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(text)
        tmp.chmod(0o700)
        tmp.replace(script)
    return script


def run_git(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    home: Path,
    credential: GitCredential | None = None,
    plain_http: bool = False,
    env_extra: Mapping[str, str] | None = None,
    input_text: str | None = None,
    error_code: str = "prepare_failed",
    check: bool = True,
    timeout: float = LOCAL_TIMEOUT,
    extra_config: Sequence[tuple[str, str]] = (),
) -> GitResult:
    """Runs `git <args>` with the fixed environment and returns its output.

    With `check`, a non-zero exit raises `GitError(error_code)` carrying git's masked stderr tail. The
    command runs in its own process group so a timeout also stops git's helpers (remote-https, ssh).
    """
    secrets = [credential.secret] if credential else []
    env = git_env(
        home, credential=credential, plain_http=plain_http, env_extra=env_extra, extra_config=extra_config
    )
    argv = ["git", *args]
    if cwd is None:
        # A command given no repository (`ls-remote`, `clone`, `init`) would otherwise look for one
        # from the service's working directory up, and use that repo's config: one an agent can
        # write (the runner started inside a repo it also runs in_place) could set `http.proxy` or
        # `url.*.insteadOf` and so receive the credential. The job's git HOME is no repository, and
        # the search stops there.
        cwd = home
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        env["GIT_CEILING_DIRECTORIES"] = str(home.parent)
    pass_fds: tuple[int, ...] = ()
    if credential is not None:
        pass_fds = (_credential_fd(credential, error_code),)
        env["CODEX_RUNNER_GIT_CREDENTIAL_FD"] = str(pass_fds[0])
    # Another git holding the index's lock (an editor's or IDE's `git status`, which refreshes the
    # index, polls an in_place repo every few seconds) fails a command at once: it is tried again
    # for a moment, as a person would. A lock file that stays (a killed git's) still fails, once
    # the wait is over, with git's own message.
    try:
        deadline = time.monotonic() + LOCK_RETRY_SECONDS
        delay = 0.02
        while True:
            returncode, out, err = _run_once(argv, cwd, env, input_text, timeout, args, error_code, pass_fds)
            if returncode == 0 or not _LOCK_BUSY.search(err) or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.32)
    finally:
        for fd in pass_fds:
            os.close(fd)
    stdout = out.decode("utf-8", "replace")
    stderr = _tail(err, secrets)
    if check and returncode != 0:
        detail = stderr.strip() or f"exit status {returncode}"
        raise GitError(f"git {_verb(args)} failed: {detail}", code=error_code, exit_code=returncode) from None
    return GitResult(returncode, stdout, stderr)


def _credential_fd(credential: GitCredential, error_code: str) -> int:
    """A memory file holding the user name and secret, one line each (close-on-exec: only the git
    command it is passed to gets it)."""
    if "\n" in credential.username or "\n" in credential.secret:
        raise GitError("the stored credential holds a line break", code=error_code)
    fd = os.memfd_create("codex-runner-git-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, f"{credential.username}\n{credential.secret}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _run_once(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    input_text: str | None,
    timeout: float,
    args: Sequence[str],
    error_code: str,
    pass_fds: tuple[int, ...] = (),
) -> tuple[int, bytes, bytes]:
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            pass_fds=pass_fds,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise GitError(f"cannot run git: {exc.strerror}", code=error_code) from None
    data = input_text.encode() if input_text is not None else None
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                # Woken every FIFO_POLL_SECONDS to look for a wait on a named pipe; a command that
                # ends sooner is not delayed (communicate returns when git exits).
                out, err = proc.communicate(
                    data, max(0.0, min(FIFO_POLL_SECONDS, deadline - time.monotonic()))
                )
                break
            except subprocess.TimeoutExpired:
                data = None  # being written already: communicate() must not be given it twice
                if time.monotonic() >= deadline:
                    raise GitError(
                        f"git {_verb(args)} timed out after {timeout:.0f} s", code=error_code
                    ) from None
                pipe = fifo_wait(proc.pid)
                if pipe is not None:
                    raise GitError(
                        f"git {_verb(args)} stopped: it waited to open {_named(pipe)}, a named pipe (FIFO) "
                        "nothing writes to or reads from; the runner's git opens no named pipes: remove it",
                        code=error_code,
                    ) from None
    except BaseException:
        _kill_group(proc)
        raise
    return proc.returncode, out, err


def _named(pipe: str) -> str:
    return repr(pipe) if pipe else "a file"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(data: bytes, secrets: Sequence[str]) -> str:
    """The last `STDERR_TAIL_BYTES` of git's stderr, masked whole before the cut: a secret that
    straddled the cut would otherwise leave its end unmasked."""
    masked = mask(data.decode("utf-8", "replace"), secrets) if secrets else data.decode("utf-8", "replace")
    return utf8_tail(masked, STDERR_TAIL_BYTES)


def _verb(args: Sequence[str]) -> str:
    """The git subcommand, for messages (global options like `--git-dir=…` skipped)."""
    it = iter(args)
    for arg in it:
        if arg in {"-C", "-c"}:
            next(it, None)
        elif not arg.startswith("-"):
            return arg
    return "command"


# --- validation -------------------------------------------------------------------------------------

_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def validate_ref_name(name: str) -> None:
    """Refuses a branch name that `git check-ref-format --branch` would refuse (and option-like ones).

    Implemented here, not by calling git, because it runs for every request and must not depend on a
    subprocess; the integration tests compare it with git's own answer.
    """
    problem = _ref_problem(name)
    if problem:
        raise GitError(f"invalid branch name {name!r}: {problem}", code="branch_failed")


def _ref_problem(name: str) -> str | None:
    if not name:
        return "empty"
    if len(name.encode()) > 255:
        return "longer than 255 bytes"
    if name.startswith("-"):
        return "starts with '-'"
    if name == "@" or name == "HEAD":
        return f"'{name}' is reserved"
    if _REF_FORBIDDEN.search(name):
        return "contains a space, a control character or one of ~ ^ : ? * [ \\"
    if ".." in name or "@{" in name or "//" in name:
        return "contains '..', '@{' or '//'"
    if name.startswith("/") or name.endswith("/") or name.endswith("."):
        return "starts or ends with '/', or ends with '.'"
    for part in name.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return "a component starts with '.' or ends with '.lock'"
    return None


_TRANSPORT_PREFIX = re.compile(r"^[A-Za-z0-9+.-]+::")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_SCP_LIKE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[^/:@\s]+):(?P<path>.+)$")


def validate_source(source: str) -> None:
    """Accepts an absolute local path or an https://, ssh://, file:// (or scp-like ssh) git URL; plain
    http:// only towards loopback. Refuses option-like values, `transport::address` forms (`ext::`,
    `fd::`), other schemes, a password in the URL, and control characters."""
    problem = _source_problem(source)
    if problem:
        raise GitError(f"invalid repo source: {problem}", code="clone_failed")


def _source_problem(source: str) -> str | None:
    if not source or source != source.strip():
        return "empty or surrounded by spaces"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in source):
        return "contains a control character"
    if source.startswith("-"):
        return "looks like a command-line option"
    if _TRANSPORT_PREFIX.match(source):
        return "transport::address forms (ext::, fd::, …) are not allowed"
    scheme_match = _SCHEME.match(source)
    if scheme_match:
        return _url_problem(scheme_match.group(1).lower(), source)
    if source.startswith("/"):
        return None if ".." not in Path(source).parts else "local path contains '..'"
    scp = _SCP_LIKE.match(source)
    if scp:
        if not _HOST.match(scp.group("host")):
            return "invalid ssh host"
        return "ssh path looks like an option" if scp.group("path").startswith("-") else None
    return "expected an absolute path or an https://, ssh:// or file:// URL"


def _url_problem(scheme: str, source: str) -> str | None:
    try:
        parts = urlsplit(source)
        port = parts.port  # raises on a malformed port
    except ValueError:
        return "malformed URL"
    del port
    if scheme == "file":
        if parts.netloc not in {"", "localhost"} or not parts.path.startswith("/"):
            return "file:// URLs must name an absolute local path"
        return None
    if scheme not in {"https", "http", "ssh"}:
        return f"transport {scheme!r} is not allowed (https, ssh, file, or a local path)"
    host = parts.hostname or ""
    if not host or (not _HOST.match(host) and not _is_ip(host)):
        return "invalid host"
    if parts.password is not None:
        return "credentials in the URL are not allowed; store them with `codex-runner credentials set`"
    if parts.username is not None and parts.username.startswith("-"):
        return "user name looks like an option"
    if scheme == "http" and not is_loopback_host(host):
        return "plain http:// is only allowed towards loopback; use https://"
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_plain_http(url: str) -> bool:
    """True for an http:// URL (which `validate_source` only lets through towards loopback)."""
    return url.lower().startswith("http://")


def without_user(url: str) -> str:
    """An http(s) URL without its user info (`https://<token>@host/…` is how tokens are often
    written into one), anything else as it is: the form handed to git and written into a
    clone's config. Over http(s) the stored credential (the helper) supplies the user name, and a
    name in the URL would stand in the command line (`/proc/<pid>/cmdline`, readable by every
    local user) and in git's "could not read Password for '<url>'". An ssh user (`git@`) is kept:
    ssh needs it, and it is no secret."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in {"http", "https"}:
        return url
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}"


def url_host(url: str) -> str | None:
    """`host[:port]` of an http(s) URL, as git's credential protocol names it; None otherwise."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        return None
    return parts.netloc.rsplit("@", 1)[-1]
