"""The `codex-runner` command line: thin, it calls the same services as the API (docs/cli.md).

Client commands (`submit`, `jobs …`) talk HTTP to `RUNNER_URL` with `RUNNER_TOKEN`; admin commands
(`tokens`, `credentials`, `migrate`) work on the local database. Every failure is one `error: …`
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading


def _interrupted_while_loading(signum: int, frame: object) -> None:
    # Ctrl-C in the second or so the imports below take: exit as Ctrl-C does later (130), not with
    # a KeyboardInterrupt traceback out of some library's import.
    os._exit(130)


def _set_sigint(handler: object, *, if_now: object) -> None:
    """Only from the main thread (elsewhere `signal.signal` raises: an import from a thread), and
    only over the handler expected there (an embedding program's own is left alone)."""
    if signal.getsignal(signal.SIGINT) is if_now and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)  # type: ignore[arg-type]


_set_sigint(_interrupted_while_loading, if_now=signal.default_int_handler)

import typer  # noqa: E402

from codex_runner import __version__  # noqa: E402
from codex_runner.cli import admin, jobs  # noqa: E402
from codex_runner.cli.common import CliError, ExitCode, failure_line, masked, settings  # noqa: E402
from codex_runner.cli_ops import register as register_ops  # noqa: E402
from codex_runner.errors import ConfigError, RunnerError  # noqa: E402

app = typer.Typer(
    name="codex-runner",
    help="Run AI coding agents as durable jobs against git repositories.",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks with locals would print tokens and keys; main() turns errors into one line instead.
    pretty_exceptions_enable=False,
)


def serve() -> None:
    """Run the HTTP API and, unless RUNNER_ENABLED=false, the launcher that runs jobs."""
    from codex_runner.pid1 import become_init_if_pid1
    from codex_runner.server import run_serve

    become_init_if_pid1()
    # Says `serving` (a service-log event) once it listens, not here, before anything could fail.
    run_serve(settings())


def worker() -> None:
    """Run only the launcher: claims and runs jobs from the shared database, no job API (with
    RUNNER_WORKER_METRICS_PORT: /healthz, /readyz and /metrics)."""
    from codex_runner.pid1 import become_init_if_pid1
    from codex_runner.server import run_worker

    become_init_if_pid1()
    run_worker(settings())


def version() -> None:
    """Print the version."""
    sys.stdout.write(f"codex-runner {__version__}\n")


# Registered here, in the order `--help` lists them.
app.command()(serve)
app.command()(worker)
app.command()(jobs.submit)
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(admin.tokens_app, name="tokens")
app.add_typer(admin.credentials_app, name="credentials")
app.command()(admin.migrate)
app.command()(admin.keygen)
app.command()(version)
register_ops(app)


# Loaded: from here Ctrl-C is a KeyboardInterrupt again, which the commands turn into exit 130.
_set_sigint(signal.default_int_handler, if_now=_interrupted_while_loading)


def _fail(line: str, code: int = ExitCode.ERROR) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.exit(code)


def _output_closed(exc: SystemExit) -> bool:
    """Whether click ended the command because standard output was closed (it exits 1 then, which
    here means "the job failed"): the SystemExit it raises while handling that EPIPE."""
    cause = exc.__context__
    return isinstance(cause, OSError) and cause.errno == errno.EPIPE


def _utf8_stdout() -> None:
    """Standard output in UTF-8 whatever the locale. A log is the redacted UTF-8 stream, written
    byte for byte (its offsets count those bytes), and JSON is UTF-8 (RFC 8259); in an ASCII or
    Latin-1 locale (a C locale without coercion) one character outside it failed the whole
    command with `UnicodeEncodeError`. stderr, for people, keeps the locale's encoding: Python
    escapes what it cannot show there."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if encoding != "utf8" and reconfigure is not None:
        reconfigure(encoding="utf-8")


def main() -> None:
    _utf8_stdout()
    try:
        app(prog_name="codex-runner")
    except SystemExit as exc:
        if _output_closed(exc):
            # `jobs logs ID | head`: the reader had enough. Not a job outcome, not an error; and
            # no second EPIPE at exit from flushing what is still buffered.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(ExitCode.OUTPUT_CLOSED)
        raise
    except CliError as exc:
        _fail(masked(exc.line()), exc.exit_code)
    except ConfigError as exc:
        _fail(f"error: {exc.message}")
    except RunnerError as exc:
        _fail(masked(f"error: {exc.message} ({exc.code})"))
    except Exception as exc:
        # Unexpected: still one line, masked with the known secrets in case a library echoed one.
        _fail(failure_line(exc))
