"""The CLI's SSE decoder and log follower against a scripted transport (no server)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from codex_runner.cli.client import RunnerClient, RunnerUnreachable
from codex_runner.cli.follow import LogFollower, SseDecoder, SseEvent


def decode(*chunks: bytes) -> list[SseEvent]:
    decoder = SseDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def test_decoder_handles_every_line_end_split_anywhere() -> None:
    wire = b": ping\r\nevent: log\r\nid: 7\r\ndata: a\r\ndata: b\r\n\r\nevent: end\rdata: {}\r\r\ndata: x\n\n"
    expected = [SseEvent("log", "a\nb", "7"), SseEvent("end", "{}", "7"), SseEvent("message", "x", "7")]
    assert decode(wire) == expected
    for cut in range(1, len(wire)):
        assert decode(wire[:cut], wire[cut:]) == expected, cut
    assert decode(*(wire[i : i + 1] for i in range(len(wire)))) == expected


def test_decoder_holds_an_unfinished_event() -> None:
    assert decode(b'event: log\r\nid: 3\r\ndata: {"content"') == []


def _log(offset: int, content: str) -> bytes:
    end = offset + len(content.encode())
    data = json.dumps({"offset": offset, "next_offset": end, "content": content})
    return f"event: log\r\nid: {end}\r\ndata: {data}\r\n\r\n".encode()


class _Broken(httpx.SyncByteStream):
    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts
        raise httpx.ReadError("connection reset")


def test_follower_resumes_from_the_last_whole_event() -> None:
    seen: list[tuple[str | None, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        last = request.headers.get("Last-Event-ID")
        seen.append((request.url.params.get("offset"), last))
        if last is None:  # cut in the middle of the second event
            return httpx.Response(200, stream=_Broken(_log(0, "one\n"), _log(4, "two\n")[:20]))
        body = _log(4, "two\n") + b'event: end\r\ndata: {"status": "failed"}\r\n\r\n'
        return httpx.Response(200, content=body)

    with RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)) as client:
        follower = LogFollower(client, "j", reconnect_delays=(0.0,))
        assert "".join(follower.stream()) == "one\ntwo\n"
    assert seen == [("0", None), ("4", "4")]
    assert (follower.status, follower.complete, follower.offset, follower.reconnects) == (
        "failed",
        True,
        8,
        1,
    )


def _refusing(calls: list[httpx.Request]) -> httpx.MockTransport:
    """A runner that is not there: every connection refused, each attempt recorded in `calls`."""

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused")

    return httpx.MockTransport(handler)


def test_follower_gives_up_after_bounded_reconnects() -> None:
    calls: list[httpx.Request] = []
    with RunnerClient("http://runner", "t", transport=_refusing(calls)) as client:
        follower = LogFollower(client, "j", reconnect_delays=(0.0, 0.0, 0.0))
        with pytest.raises(RunnerUnreachable, match="after 3 reconnects"):
            list(follower.stream())
    assert len(calls) == 4


def test_follower_stops_at_the_deadline() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b": ping\r\n\r\n")  # ends without `end`

    with RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)) as client:
        follower = LogFollower(client, "j", reconnect_delays=(0.05,) * 1000)
        started = time.monotonic()
        assert list(follower.stream(deadline=started + 0.3)) == []
    assert 0.25 <= time.monotonic() - started < 2 and not follower.complete


class _Endless(httpx.SyncByteStream):
    """A job that keeps writing: a log event every 20 ms, never an `end`."""

    def __iter__(self) -> Iterator[bytes]:
        offset = 0
        while True:
            time.sleep(0.02)
            yield _log(offset, "line\n")
            offset += 5


def test_follower_stops_at_the_deadline_while_the_log_keeps_coming() -> None:
    """`submit --follow --wait-timeout`: the deadline was looked at only between connections, so
    a job that kept writing was followed to its end."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Endless())

    with RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)) as client:
        follower = LogFollower(client, "j", reconnect_delays=(0.05,))
        started = time.monotonic()
        got = "".join(follower.stream(deadline=started + 0.3))
    assert 0.25 <= time.monotonic() - started < 2 and not follower.complete
    assert got and set(got.splitlines()) == {"line"}


def test_cli_args_are_verbatim_and_never_unsendable(tmp_path: Path) -> None:
    import io

    from codex_runner.cli.args import parse_args, parse_value
    from codex_runner.cli.common import CliError

    assert parse_value("1e400") == "1e400" and parse_value("-1e999") == "-1e999"  # not inf
    assert parse_value("1.5") == 1.5 and parse_value("NaN") == "NaN"
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"a\r\nb\rc\n")
    assert parse_args([f"message=@{crlf}"], io.StringIO())["message"] == "a\r\nb\rc\n"
    stdin = io.TextIOWrapper(io.BytesIO(b"x\r\ny"), encoding="utf-8")
    assert parse_args(["message=-"], stdin)["message"] == "x\r\ny"
    bad = io.TextIOWrapper(io.BytesIO(b"a\xffb"), encoding="utf-8", errors="surrogateescape")
    with pytest.raises(CliError, match="standard input is not UTF-8 text"):
        parse_args(["message=-"], bad)


def test_cli_repo_ids_and_urls() -> None:
    from codex_runner.cli.common import CliError
    from codex_runner.jobs import is_id_text

    assert is_id_text("e1897c5c-2fd4-58b5-9dc1-ab0a55485888")
    # Valid repo names that uuid.UUID also parses: sent as names, not ids.
    for name in (
        "deadbeefdeadbeefdeadbeefdeadbeef",
        "E1897C5C-2FD4-58B5-9DC1-AB0A55485888",
        "{e1897c5c-2fd4-58b5-9dc1-ab0a55485888}",
    ):
        assert not is_id_text(name)
    with pytest.raises(CliError, match="must not hold a user name or password"):
        RunnerClient("http://user:pw@127.0.0.1:1", "t")


def test_an_unparsable_runner_url_is_not_repeated() -> None:
    """The error line repeated the whole URL, password and all."""
    from codex_runner.cli.common import CliError

    with pytest.raises(CliError) as caught:
        RunnerClient("http://u:hunter2SECRETpw@127.0.0.1:99999", "t")
    assert "hunter2SECRETpw" not in str(caught.value) and "RUNNER_URL" in str(caught.value)


def test_reading_a_log_without_follow_does_not_wait_for_an_unreachable_runner() -> None:
    """`jobs logs ID` retried an unreachable runner, silently, for 30 s before its error line,
    while every other one-shot command (`jobs show`, `jobs list`) fails at once."""
    calls: list[httpx.Request] = []
    with RunnerClient("http://runner", "t", transport=_refusing(calls)) as client:
        follower = LogFollower(client, "j")
        started = time.monotonic()
        with pytest.raises(RunnerUnreachable, match="cannot reach the runner"):
            list(follower.chunks(follow=False))
    assert len(calls) == 1 and time.monotonic() - started < 2


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(503, json={"detail": "the database did not answer", "code": "unavailable"}),
        httpx.Response(502, text="<html>bad gateway</html>"),  # a proxy before a restarting runner
        httpx.Response(504, text="gateway timeout"),
    ],
)
def test_waits_and_follows_ride_out_a_moment_of_not_now(answer: httpx.Response) -> None:
    """`submit --wait` and `jobs logs -f` retried a runner that did not answer for 30 s, but died
    (exit 2) on the first 503 `unavailable` (a database blip) or the 502/504 that a proxy answers
    while the runner behind it restarts."""
    from codex_runner.cli.follow import wait_for_job

    calls: dict[str, int] = {"job": 0, "stream": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        kind = "stream" if request.url.path.endswith("/stream") else "job"
        calls[kind] += 1
        if calls[kind] <= 2:
            return answer
        if kind == "stream":
            return httpx.Response(
                200, content=_log(0, "all\n") + b'event: end\r\ndata: {"status": "success"}\r\n\r\n'
            )
        return httpx.Response(200, json={"id": "j", "status": "success"})

    with RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)) as client:
        job, done = wait_for_job(client, "j", on_poll=lambda _: None, poll_seconds=0.0)
        follower = LogFollower(client, "j", reconnect_delays=(0.0,) * 3)
        got = "".join(follower.stream())
    assert done and job["status"] == "success"
    assert got == "all\n" and follower.status == "success"
    assert calls == {"job": 3, "stream": 3}


def test_a_follow_refused_for_too_many_streams_waits_its_retry_after() -> None:
    """`jobs logs -f` answered 429 `too_many_streams` gave up at once (exit 2) though the answer
    says when to come back (`Retry-After`); a reconnect could meet it for its own previous
    connection, not yet noticed gone. It now waits that long, says so, and tries again."""
    opened: list[float] = []
    notices: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        opened.append(time.monotonic())
        if len(opened) <= 2:
            body = {"detail": "1 log streams are open for this user already", "code": "too_many_streams"}
            return httpx.Response(429, json=body, headers={"Retry-After": "0.3"})
        return httpx.Response(
            200, content=_log(0, "all\n") + b'event: end\r\ndata: {"status": "success"}\r\n\r\n'
        )

    with RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)) as client:
        follower = LogFollower(client, "j", reconnect_delays=(0.0,) * 3)
        follower.notice = notices.append
        assert "".join(follower.stream()) == "all\n"
    assert follower.status == "success" and len(opened) == 3
    assert all(later - earlier >= 0.29 for earlier, later in itertools.pairwise(opened))
    assert (
        len(notices) == 2
        and "(too_many_streams)" in notices[0]
        and "trying again in 0.3 s (1/3)" in notices[0]
    )


def test_a_follow_says_it_is_reconnecting_from_the_second_failure_in_a_row() -> None:
    """A runner gone for a while left `jobs logs -f` silent for its whole ~30 s of reconnects; one
    dropped connection (a restart's blip) says nothing, every failure after it says so."""
    opened: list[int] = []
    notices: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        opened.append(1)
        if len(opened) <= 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(
            200, content=_log(0, "back\n") + b'event: end\r\ndata: {"status": "success"}\r\n\r\n'
        )

    with RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)) as client:
        follower = LogFollower(client, "j", reconnect_delays=(0.0,) * 5, notice=notices.append)
        assert "".join(follower.stream()) == "back\n"
    assert len(notices) == 2, notices  # failures 2 and 3
    assert all("trying again in 0 s" in n for n in notices) and notices[-1].endswith("(3/5)")


def test_runner_url_keeps_its_path_prefix_and_refuses_a_query() -> None:
    """A runner behind a proxy at a path prefix works with or without a trailing slash; a query in
    RUNNER_URL made httpx drop the prefix *and* the route (every request went to the prefix and
    came back 404 `Not Found`): it is refused with a line naming the setting."""
    from codex_runner.cli.common import CliError

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={})

    for base in ("http://runner/pre", "http://runner/pre/"):
        with RunnerClient(base, "t", transport=httpx.MockTransport(handler)) as client:
            client.get("/api/runner/jobs/j/logs", params={"offset": 3})
    assert seen == ["http://runner/pre/api/runner/jobs/j/logs?offset=3"] * 2
    for bad in ("http://runner/pre?tenant=a", "http://runner/pre#x"):
        with pytest.raises(CliError, match="RUNNER_URL: must not have a query"):
            RunnerClient(bad, "t", transport=httpx.MockTransport(handler))


def test_the_cli_module_imports_from_a_thread() -> None:
    """Its Ctrl-C-while-loading handler is set only from the main thread: `signal.signal` raises
    anywhere else, and an import of the CLI from a thread (a program embedding it) failed."""
    import subprocess
    import sys

    code = (
        "import threading\n"
        "errors = []\n"
        "def imp():\n"
        "    try:\n"
        "        import codex_runner.cli\n"
        "    except Exception as exc:\n"
        "        errors.append(repr(exc))\n"
        "t = threading.Thread(target=imp); t.start(); t.join()\n"
        "print(errors)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_wait_says_so_while_the_runner_does_not_answer() -> None:
    """`submit --wait`'s status line stopped moving, without a word, for the ~30 s a wait rides out
    a runner that does not answer: each retry is now told (the status line shows it)."""
    from codex_runner.cli.follow import wait_for_job

    answers: list[int] = []
    notices: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        answers.append(1)
        if len(answers) <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"id": "j", "status": "success"})

    with RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)) as client:
        job, done = wait_for_job(client, "j", on_poll=lambda _: None, notice=notices.append)
    assert done and job["status"] == "success"
    assert len(notices) == 2 and all("trying again in 1 s" in n for n in notices), notices


def test_a_wait_that_loses_the_runner_names_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """`submit --wait` whose runner stays away ended on `error: cannot reach the runner …` alone:
    a CI log that kept only the last line did not say which job to look up (a lost `--follow`
    says `lost the log stream of job …`)."""
    from codex_runner.cli import client as client_module
    from codex_runner.cli import follow as follow_module
    from codex_runner.cli.jobs import await_job

    monkeypatch.setattr(follow_module, "patiently", partial(client_module.patiently, grace=0.0))
    calls: list[httpx.Request] = []
    client = RunnerClient("http://runner", "t", transport=_refusing(calls))
    with client, pytest.raises(RunnerUnreachable) as caught:
        await_job(client, "job-42", follow=False, wait_timeout=None, json_out=False)
    line = caught.value.line()
    assert line.startswith("error: cannot reach the runner"), line
    assert "stopped waiting for job job-42 (see: codex-runner jobs show job-42)" in line, line


def test_a_follow_whose_log_is_on_another_instance_still_waits_for_the_job(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`submit --follow` of a job that a worker with another log folder took (409 `log_not_here`)
    ended at once with exit 2 while the job ran on: a CI step lost its wait and its exit code. It
    now says why there is no log and waits for the job, its exit code following the job's."""
    from codex_runner.cli.common import ExitCode
    from codex_runner.cli.jobs import await_job

    polls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/stream"):
            body = {"detail": "the log of job j is in the log folder of 'w2'", "code": "log_not_here"}
            return httpx.Response(409, json=body)
        polls.append(1)
        status = "running" if len(polls) < 3 else "failed"
        return httpx.Response(200, json={"id": "j", "status": status, "exit_code": 3, "duration_ms": 5})

    with RunnerClient("http://runner", "t", transport=httpx.MockTransport(handler)) as client:
        code = await_job(client, "j", follow=True, wait_timeout=30, json_out=False)
    assert code == ExitCode.JOB_FAILED and len(polls) == 3
    assert "log_not_here" in capsys.readouterr().err
