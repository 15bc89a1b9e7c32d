"""Client commands: `submit` and `jobs list|show|cancel|events|logs`, over the HTTP API."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

import typer
from rich.status import Status as Spinner
from rich.table import Table
from rich.text import Text

from codex_runner.cli.args import parse_args
from codex_runner.cli.client import RunnerClient, patiently
from codex_runner.cli.common import (
    CliError,
    ExitCode,
    TrimmedTable,
    cell,
    data_table,
    err,
    format_duration,
    info,
    out,
    print_json,
    settings,
    status_text,
)
from codex_runner.cli.follow import EXIT_BY_STATUS, TERMINAL, LogFollower, jobs_path, wait_for_job
from codex_runner.jobs import Status, is_id_text

jobs_app = typer.Typer(help="List, inspect, cancel and follow jobs.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
JobId = Annotated[str, typer.Argument(help="The job's id.")]
# After this long in `queued`, the status line says why a job may not start.
QUEUED_HINT_SECONDS = 10.0


def _client() -> RunnerClient:
    return RunnerClient.from_settings(settings())


def _write(text: str, *, to_stderr: bool = False) -> None:
    stream = sys.stderr if to_stderr else sys.stdout
    stream.write(text)
    stream.flush()


def submit(
    repo: Annotated[str, typer.Argument(help="Repo name from runner.toml (or its id).")],
    script: Annotated[str, typer.Argument(help="Script key, e.g. codex.exec.")],
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg",
            "-a",
            metavar="KEY=VALUE",
            help="Script argument; VALUE is JSON if it parses, else a string; @PATH reads a file, - reads stdin.",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", metavar="KEY", help="Replays instead of creating twice."),
    ] = None,
    json_out: JsonOpt = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the job to end; exit code follows it.")
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Like --wait, printing the log as it grows.")
    ] = False,
    wait_timeout: Annotated[
        float | None,
        typer.Option(
            "--wait-timeout", metavar="SECONDS", min=0.1, help="Stop waiting after this long (exit 5)."
        ),
    ] = None,
) -> None:
    """Submit a job: run SCRIPT on REPO. Prints the job id (or JSON) on stdout."""
    loaded = settings()
    if idempotency_key is not None:
        from codex_runner.runtime import validate_idempotency_key

        try:
            # As the server reads it (no blanks around it): httpx sends no header value with them.
            idempotency_key = validate_idempotency_key(idempotency_key)
        except Exception:
            raise CliError("--idempotency-key: must be 1-255 printable ASCII characters") from None
    args = parse_args(arg or [], sys.stdin)
    body: dict[str, Any] = {"script_key": script, "args": args}
    body["repo_id" if is_id_text(repo) else "repo"] = repo
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
    with RunnerClient.from_settings(loaded) as client:
        try:
            _, job = client.post("/api/runner/jobs", body, headers)
        except CliError as exc:
            exc.message += _quoting_hint(arg or [], args, exc)
            raise
        job_id = str(job["id"])
        if job.get("deduplicated"):
            info(
                f"deduplicated: idempotency key {idempotency_key!r} already made job {job_id} "
                f"({job['status']}); no new job"
            )
        else:
            info(f"created job {job_id} ({job['status']}): script {script} on repo {repo}")
        if not (wait or follow):
            if json_out:
                print_json(job)
            else:
                _write(job_id + "\n")
                info(f"follow it with: codex-runner jobs logs {job_id} -f")
            return
        if not (json_out or follow):
            _write(job_id + "\n")
        code = await_job(client, job_id, follow=follow, wait_timeout=wait_timeout, json_out=json_out)
    raise typer.Exit(int(code))


def _quoting_hint(items: list[str], args: dict[str, Any], exc: CliError) -> str:
    """For each `--arg KEY=VALUE` read as JSON (`n=42` is a number) that the server refused as not
    a string: how to write the string instead."""
    if exc.code != "invalid_args":
        return ""
    typed = dict(item.partition("=")[::2] for item in items)
    quoted = [
        f"{key}='{json.dumps(typed[key])}'"
        for key, value in args.items()
        if isinstance(value, (bool, int, float)) and f"{key}: must be a string" in exc.message
    ]
    return (
        f" (a VALUE that is JSON is read as JSON; for a string write {', '.join(quoted)})" if quoted else ""
    )


def await_job(
    client: RunnerClient, job_id: str, *, follow: bool, wait_timeout: float | None, json_out: bool
) -> ExitCode:
    """Waits (showing a status line, or the log with `follow`) and maps the outcome to an exit code."""
    deadline = time.monotonic() + wait_timeout if wait_timeout else None
    try:
        if follow and _follow_log(client, job_id, deadline=deadline, json_out=json_out):
            # After the stream's `end` the job is terminal: one read gets it for the outcome line.
            job, done = wait_for_job(client, job_id, on_poll=lambda _: None, deadline=deadline)
        else:
            with StatusLine(job_id) as line:
                job, done = wait_for_job(
                    client, job_id, on_poll=line.update, deadline=deadline, notice=line.trouble
                )
    except KeyboardInterrupt:
        info(f"stopped waiting; job {job_id} keeps running (see: codex-runner jobs show {job_id})")
        return ExitCode.INTERRUPTED
    except CliError as exc:
        # The runner was lost for good (or answered an error) mid-wait: the error line is all a
        # script's log may keep, so it names the job, which lives on whatever became of the wait
        # (a lost log stream's line names it already).
        if job_id not in exc.message:
            exc.message += f"; stopped waiting for job {job_id} (see: codex-runner jobs show {job_id})"
        raise
    if json_out:
        print_json(job)
    if not done:
        info(f"stopped waiting after {wait_timeout:g}s: job {job_id} is still {job.get('status')}")
        return ExitCode.WAIT_TIMEOUT
    err.print(outcome_line(job))
    return EXIT_BY_STATUS.get(str(job["status"]), ExitCode.ERROR)


def _follow_log(client: RunnerClient, job_id: str, *, deadline: float | None, json_out: bool) -> bool:
    """Prints the job's log as it grows until its end (True), or says why this runner cannot
    show it (409 `log_not_here`: another instance with its own log folder runs the job) and
    returns False, for the caller to wait for the job without it: the wait, and the exit code
    that follows the job, matter more than the log."""
    info(f"following the log of job {job_id} (Ctrl-C stops following; the job keeps running)")
    follower = LogFollower(client, job_id, notice=info)
    try:
        # With --json stdout is reserved for the final job object.
        for chunk in follower.stream(deadline=deadline):
            _write(chunk, to_stderr=json_out)
    except CliError as exc:
        if exc.code != "log_not_here":
            raise
        info(f"{exc.reason()}; waiting for the job to end without its log")
        return False
    return True


class StatusLine:
    """`job … status · elapsed` on stderr: a live spinner on a terminal; elsewhere (CI logs, pipes)
    one line per status change, since a spinner would only print escape codes there."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.started = time.monotonic()
        self.last_status: str | None = None
        self.hinted = False
        self._spinner: Spinner | None = err.status("", spinner="dots") if err.is_terminal else None

    def __enter__(self) -> StatusLine:
        if self._spinner is not None:
            self._spinner.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._spinner is not None:
            self._spinner.stop()

    def trouble(self, message: str) -> None:
        """The runner does not answer for now: said on the line (a spinner) or as a line of its own,
        instead of a status that silently stops moving."""
        line = Text.assemble(f"job {self.job_id} ", (message, "yellow"))
        if self._spinner is not None:
            self._spinner.update(line)
        else:
            err.print(line)
        self.last_status = None  # the next status read is shown again, as news

    def update(self, job: dict[str, Any]) -> None:
        status = str(job.get("status"))
        elapsed = time.monotonic() - self.started
        line = Text.assemble(
            f"job {self.job_id} ", status_text(status), f" · {format_duration(elapsed * 1000)}"
        )
        hint = status == "queued" and elapsed >= QUEUED_HINT_SECONDS
        if hint:
            line.append(" · still queued: is a `serve` or `worker` with RUNNER_ENABLED=true running?", "dim")
        if self._spinner is not None:
            self._spinner.update(line)
        elif status in TERMINAL:
            pass  # the outcome line that follows says it, with more
        elif status != self.last_status or (hint and not self.hinted):
            err.print(line)
        self.hinted = self.hinted or hint
        self.last_status = status


def outcome_line(job: dict[str, Any]) -> Text:
    status = str(job.get("status"))
    line = Text.assemble(f"job {job.get('id')} ", status_text(status))
    if job.get("duration_ms") is not None:
        line.append(f" in {format_duration(job['duration_ms'])}")
    if job.get("exit_code") is not None:
        line.append(f" (exit {job['exit_code']})")
    if status != "success" and (job.get("error_code") or job.get("error_message")):
        line.append(
            cell(f": {job.get('error_code') or 'error'}: {job.get('error_message') or ''}".rstrip(": "))
        )
    result = job.get("result")
    if isinstance(result, dict) and result.get("commit"):
        line.append(f"; commit {str(result['commit'])[:12]} on {result.get('branch')}: {_changes(result)}")
    return line


def _changes(result: dict[str, Any]) -> str:
    return (
        f"{result.get('files_changed') or 0} file(s), "
        f"+{result.get('lines_added') or 0} -{result.get('lines_removed') or 0}"
    )


@jobs_app.command("list")
def list_jobs(
    status: Annotated[
        list[Status] | None, typer.Option("--status", "-s", help="Only these statuses (repeatable).")
    ] = None,
    repo_id: Annotated[
        str | None,
        typer.Option(
            "--repo", "--repo-id", metavar="REPO", help="Only this repo's jobs: its name or its id."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="At most this many jobs.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (newest first).")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """List jobs, newest first (users see their own, admins everyone's)."""
    params: list[tuple[str, str | int]] = [("status", s.value) for s in status or []]
    if repo_id:
        params.append(("repo_id", repo_id))
    params += [("limit", limit), ("offset", offset)]
    with _client() as client:
        page = client.get("/api/runner/jobs", params=params)
    if json_out:
        print_json(page)
        return
    table = data_table("ID", "STATUS", "REPO", "SCRIPT", "USER", "CREATED", "DURATION")
    for job in page["items"]:
        table.add_row(
            cell(job["id"]),
            status_text(job["status"]),
            cell(job.get("repo")),
            cell(job.get("script_key")),
            cell(job.get("requested_by")),
            cell(job.get("created_at")),
            cell(format_duration(job.get("duration_ms"))),
        )
    if page["items"]:
        out.print(table)
        info(f"jobs {offset + 1}-{offset + len(page['items'])} of {page['total']}")
    else:
        info(f"no jobs here ({page['total']} in all)")


@jobs_app.command("show")
def show_job(job_id: JobId, json_out: JsonOpt = False) -> None:
    """Show one job with its stages, result and events."""
    with _client() as client:
        job = client.get(jobs_path(job_id))
    if json_out:
        print_json(job)
        return
    grid = TrimmedTable.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    status = status_text(job["status"])
    if job.get("exit_code") is not None:
        status.append(f" (exit {job['exit_code']})")
    rows: list[tuple[str, Text]] = [
        ("id", cell(job["id"])),
        ("status", status),
        ("repo", cell(job.get("repo"))),
        ("script", cell(job.get("script_key"))),
        ("args", cell(json.dumps(job.get("args"), ensure_ascii=False))),
        ("requested by", cell(job.get("requested_by"))),
        ("created", cell(job.get("created_at"))),
        ("started", cell(job.get("started_at"))),
        ("finished", cell(job.get("finished_at"))),
        ("duration", cell(format_duration(job.get("duration_ms")))),
        ("runner", cell(job.get("runner_id"))),
        ("attempt", cell(job.get("attempt"))),
    ]
    if job.get("error_code") or job.get("error_message"):
        rows.append(("error", cell(f"{job.get('error_code')}: {job.get('error_message')}")))
    result = job.get("result")
    if isinstance(result, dict):
        rows += [
            ("branch", cell(f"{result.get('branch')} (from {result.get('base_branch')})")),
            ("commit", cell(result.get("commit") or "none (nothing changed)")),
            ("changes", cell(_changes(result))),
            ("pushed", cell("yes" if result.get("pushed") else "no")),
        ]
    for name, value in rows:
        grid.add_row(name, value)
    out.print(grid)
    stages = [s for s in job.get("stages") or [] if s.get("status") != "pending"]
    if stages:
        table = data_table("STAGE", "STATUS", "STARTED", "FINISHED", "EXIT")
        for stage in stages:
            table.add_row(
                cell(stage.get("name")),
                cell(stage.get("status")),
                cell(stage.get("started_at")),
                cell(stage.get("finished_at")),
                cell(stage.get("exit_code")),
            )
        out.print()
        out.print(table)
        # What a failed stage said (the stderr tail of a script, git's message): often the one
        # line that tells why the job failed.
        for stage in stages:
            if stage.get("error"):
                out.print()
                out.print(Text(f"{stage.get('name')} {stage.get('status')}:", style="bold"))
                out.print(cell(stage["error"].rstrip("\n")))
    if job.get("events"):
        out.print()
        out.print(_events_table(job["events"]))


def _events_table(events: list[dict[str, Any]]) -> Table:
    table = data_table("TIME", "EVENT", "ACTOR", "MESSAGE")
    for event in events:
        table.add_row(
            cell(event.get("created_at")),
            cell(event.get("event_type")),
            cell(event.get("actor")),
            cell(event.get("message")),
        )
    return table


@jobs_app.command("cancel")
def cancel_job(job_id: JobId, json_out: JsonOpt = False) -> None:
    """Cancel a job: a queued one at once, a running one within the kill grace period."""
    with _client() as client:
        code, job = client.post(jobs_path(job_id, "cancel"))
    if json_out:
        print_json(job)
    if code == 202:
        info(f"cancel requested for job {job_id}; it stops within RUNNER_KILL_GRACE_SECONDS")
    else:
        info(f"job {job_id} {job['status']}")


@jobs_app.command("events")
def job_events(job_id: JobId, json_out: JsonOpt = False) -> None:
    """A job's events (its audit trail), oldest first."""
    with _client() as client:
        page = client.get(jobs_path(job_id, "events"))
    if json_out:
        print_json(page)
    else:
        out.print(_events_table(page["items"]))


def _say_if_queued(client: RunnerClient, job_id: str) -> None:
    """A queued job has no log yet, and its stream says nothing until it starts: a line on stderr
    (stdout is the log's alone) tells why the wait is silent."""
    job: dict[str, Any] = patiently(partial(client.get, jobs_path(job_id)), notice=info)
    if job.get("status") != "queued":
        return
    line = f"job {job_id} is queued; waiting for it to start..."
    if _age_seconds(job.get("created_at")) >= QUEUED_HINT_SECONDS:  # `submit --wait`'s hint, as late
        line += " (still queued: is a `serve` or `worker` with RUNNER_ENABLED=true running?)"
    info(line)


def _say_if_not_started(client: RunnerClient, job_id: str) -> None:
    """An empty page of a job that has not started: say so on stderr, or the silence reads as an
    empty log of a job that ran."""
    job: dict[str, Any] = client.get(jobs_path(job_id))
    if job.get("status") == "queued":
        info(
            f"job {job_id} is queued: no log yet; `codex-runner jobs logs {job_id} -f` follows it once it starts"
        )


def _age_seconds(stamp: object) -> float:
    """Seconds since an API timestamp (`2026-12-03T17:49:19.264Z`); 0 when it is not one."""
    try:
        then = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (datetime.now(UTC) - then).total_seconds() if then.tzinfo else 0.0


@jobs_app.command("logs")
def job_logs(
    job_id: JobId,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep printing until the job ends; exit code follows it."),
    ] = False,
    offset: Annotated[int, typer.Option(min=0, help="Start at this byte offset of the redacted log.")] = 0,
) -> None:
    """Print a job's redacted log (stdout and stderr merged)."""
    with _client() as client:
        follower = LogFollower(client, job_id, offset=offset, notice=info)
        try:
            if follow:
                _say_if_queued(client, job_id)
            for chunk in follower.stream() if follow else follower.chunks(follow=False):
                _write(chunk)
            if not follow and follower.offset == offset and not follower.complete:
                _say_if_not_started(client, job_id)
        except KeyboardInterrupt:
            # Ctrl-C is how one stops following: not an error.
            info(f"stopped following at offset {follower.offset}")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    if follow and follower.status is not None:
        err.print(Text.assemble(f"job {job_id} ", status_text(follower.status)))
        raise typer.Exit(int(EXIT_BY_STATUS.get(follower.status, ExitCode.ERROR)))
