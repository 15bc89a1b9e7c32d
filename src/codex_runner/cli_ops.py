"""Operations commands: `doctor`, `cleanup`, `backup`, `restore` (SPEC §9, docs/operations.md).

`register(app)` adds them to the main typer app. Each failure is one `error: …` line on stderr and
a non-zero exit code, never a traceback, even outside `codex_runner.cli.main`.

`codex_runner.cli` imports this module while it initialises, so the shared console helpers in
`codex_runner.cli.common` are imported inside the commands, not at the top; so are the database
layer and the catalog, which a client command (`submit`, `jobs …`) never needs: they were over
half of every command's start-up (tests/unit/test_cli_imports.py).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

from codex_runner.errors import ConfigError, RunnerError

if TYPE_CHECKING:
    from codex_runner.config import Settings
    from codex_runner.runtime import Runtime

P = ParamSpec("P")
R = TypeVar("R")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
# doctor: 1 means "a blocking check failed", 2 (ExitCode.ERROR) that the command itself could not run.
CHECKS_FAILED = 1


def _one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from codex_runner.cli.common import ExitCode, failure_line, masked

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:
            raise  # stdout closed (`doctor | head`): click and `cli.main` make it exit 141, quietly
        except RunnerError as exc:
            line = masked(f"error: {exc.message}")
        except OSError as exc:
            line = failure_line(exc) if exc.filename else masked(f"error: {exc.strerror or exc}")
        except Exception as exc:
            line = failure_line(exc)

        sys.stderr.write(line + "\n")
        raise typer.Exit(ExitCode.ERROR)

    return wrapper


def _settings() -> Settings:
    """Settings, with service logs on stderr at WARNING: stdout carries the command's data only."""
    from codex_runner.cli.common import settings
    from codex_runner.ops.logging import configure_logging

    loaded = settings()
    configure_logging(loaded, level=logging.WARNING)
    return loaded


@contextmanager
def _runtime(loaded: Settings, *, migrate: bool = True) -> Iterator[Runtime]:
    """A runtime on the local database, migrated, without syncing repos: a command run with another
    runner.toml must not change what a running server has configured. Without `migrate` (a dry
    run, which changes nothing), a database that is missing or not at head is an error instead."""
    import sqlalchemy as sa

    from codex_runner.ops.audit import attach
    from codex_runner.runtime import Runtime
    from codex_runner.store.migrate import check_not_newer, current_revision, head_revision, upgrade

    if not migrate and loaded.is_sqlite:
        db_file = sa.engine.make_url(loaded.database_url).database
        if db_file and db_file != ":memory:" and not Path(db_file).exists():
            raise ConfigError(f"no database at {db_file}: nothing to report (a dry run creates nothing)")
    rt = Runtime.open(loaded, migrate=False)
    try:
        if migrate:
            upgrade(rt.engine)
        elif (current := current_revision(rt.engine)) != (head := head_revision()):
            check_not_newer(current)
            raise ConfigError(
                f"database schema is at {current or 'nothing'}, expected {head}: run `codex-runner migrate` "
                "first (a dry run changes nothing)"
            )
        attach(rt)
        yield rt
    finally:
        rt.close()


@_one_line_errors
def doctor(json_out: JsonOpt = False) -> None:
    """Run the start-up checks; exit 1 when one of them blocks start-up."""
    from codex_runner.catalog import Catalog
    from codex_runner.cli.common import info, masked, print_json
    from codex_runner.ops.doctor import blocking_failures, run_checks

    loaded = _settings()
    checks = run_checks(loaded, Catalog.from_settings(loaded))
    failed = blocking_failures(checks)
    if json_out:
        # Masked as the text lines are: a check's message or detail may quote a setting.
        print_json({"ok": not failed, "checks": [_masked_strings(c.to_dict(), masked) for c in checks]})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            level = {"ok": "ok", "warn": "warn", "fail": "FAIL"}[c.level]
            sys.stdout.write(masked(f"{level:<5} {c.name:<{width}}  {c.message}") + "\n")
        warnings = sum(1 for c in checks if c.level == "warn")
        if failed:
            info(f"{len(failed)} blocking problem(s), {warnings} warning(s)")
        else:
            info(f"no blocking problem ({warnings} warning(s))")
    if failed:
        raise typer.Exit(CHECKS_FAILED)


def _masked_strings(value: Any, mask: Callable[[str], str]) -> Any:
    """`value` with every string in it (dict keys and values, list items) passed through `mask`."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {_masked_strings(k, mask): _masked_strings(v, mask) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked_strings(v, mask) for v in value]
    return value


@_one_line_errors
def cleanup(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be deleted; change nothing.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete old terminal jobs (RUNNER_RETENTION_DAYS, keeping RUNNER_RETENTION_KEEP) and orphaned files."""
    from codex_runner.cli.common import info, print_json
    from codex_runner.ops.retention import cleanup as run_cleanup
    from codex_runner.store.instances import InstanceRegistry

    loaded = _settings()
    with _runtime(loaded, migrate=not dry_run) as rt:
        # A live server's spare pools and mirrors are its own retention's to judge, by its catalog.
        live = InstanceRegistry(rt.engine, loaded.id).live_instances(loaded.stale_after_seconds)
        report = run_cleanup(rt, dry_run=dry_run, shared_caches=not live)
    if live:
        info(f"spare pools and mirrors left to the live instance(s) {', '.join(live)}")
    if json_out:
        print_json(report.to_dict())
    else:
        sys.stdout.write(report.summary() + "\n")
    for error in report.errors[:20]:
        info(f"warning: could not remove {error}")
    if report.errors:
        # Not all that was due went: a cron job or a script must see it (the rest was done).
        raise typer.Exit(1)


@_one_line_errors
def backup(
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the archive (RUNNER_BACKUP_DIR).")
    ] = None,
    retention_days: Annotated[
        int | None, typer.Option("--retention-days", min=1, help="Then delete backups older than N days.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write runner-<UTC timestamp>.tar.gz: database, logs and run manifests, with checksums."""
    from codex_runner.cli.common import info, print_json
    from codex_runner.ops.backup import backup as run_backup

    result = run_backup(_settings(), out_dir=out, retention_days=retention_days)
    if json_out:
        print_json(result.to_dict())
        return
    sys.stdout.write(f"{result.path}\n")
    info(f"backup written: {result.members} members, {result.size} bytes, sha256 {result.sha256}")
    for path in result.deleted:
        info(f"deleted old backup {path.name}")


@_one_line_errors
def restore(
    archive: Annotated[Path, typer.Argument(help="A runner-*.tar.gz made by `codex-runner backup`.")],
    force: Annotated[
        bool, typer.Option("--force", help="Restore even while a runner instance is live.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Verify ARCHIVE, then replace the database and put back logs and run manifests."""
    from codex_runner.cli.common import info, print_json
    from codex_runner.ops.backup import restore as run_restore

    result = run_restore(_settings(), archive, force=force)
    if json_out:
        print_json(result.to_dict())
        return
    info(
        f"restored {result.backend} database from {result.archive.name} (made {result.created_at}), "
        f"{result.logs} logs, {result.manifests} run manifests; start the runner to migrate if needed"
    )


def register(app: typer.Typer) -> None:
    for command in (doctor, cleanup, backup, restore):
        app.command()(command)
