"""CodexEventParser on event lines captured from real codex 0.169 runs (tests/e2e/data) and on
hand-made edge cases: chunk boundaries, junk, over-long lines, caps, failure detection."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from codex_runner.execution.codex_events import CodexEventParser

DATA = Path(__file__).parents[1] / "e2e" / "data"
SAMPLE = (DATA / "codex_events_sample.jsonl").read_bytes()
HTTP_500 = (DATA / "codex_events_http_500.jsonl").read_bytes()
STREAM_CUT = (DATA / "codex_events_stream_cut.jsonl").read_bytes()


def parse(*chunks: bytes, **kwargs: Any) -> CodexEventParser:
    parser = CodexEventParser(**kwargs)
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()
    return parser


def line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def command_item(item_id: str, command: str, exit_code: int | None, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "command_execution",
        "command": command,
        "aggregated_output": "",
        "exit_code": exit_code,
        "status": status,
    }


def test_real_successful_run() -> None:
    summary = parse(SAMPLE).summary()
    path = json.loads(SAMPLE.splitlines()[4])["item"]["changes"][0]["path"]
    assert summary == {
        "thread_id": json.loads(SAMPLE.splitlines()[0])["thread_id"],
        "final_message": "Added hello.txt.",
        "usage": {
            "input_tokens": 3600,
            "cached_input_tokens": 600,
            "cache_write_input_tokens": 0,
            "output_tokens": 240,
            "reasoning_output_tokens": 30,
        },
        "commands": [{"command": "/bin/bash -lc 'echo hello-from-shell'", "exit_code": 0}],
        "files_changed": [{"path": path, "kind": "add"}],
        "failed": False,
        "error": None,
        "warnings": [],
        "retries": 0,
        "entries_dropped": 0,
    }


@given(st.lists(st.integers(min_value=0, max_value=len(SAMPLE)), max_size=20))
def test_any_chunking_gives_the_same_summary(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(SAMPLE)]
    chunks = [SAMPLE[a:b] for a, b in itertools.pairwise(bounds)]
    assert parse(*chunks).summary() == parse(SAMPLE).summary()


def test_byte_by_byte() -> None:
    parser = CodexEventParser()
    for i in range(len(SAMPLE)):
        parser.feed(SAMPLE[i : i + 1])
    assert parser.summary() == parse(SAMPLE).summary()


def test_real_http_500_run_fails_with_codex_message() -> None:
    parser = parse(HTTP_500)
    assert parser.failed
    assert parser.error_message is not None
    assert parser.error_message.startswith("We\u2019re currently experiencing high demand")  # codex's wording
    assert parser.retries == 1
    assert parser.summary()["error"] == parser.error_message


def test_real_stream_cut_run_fails_and_keeps_the_partial_message() -> None:
    parser = parse(STREAM_CUT)
    assert parser.failed
    assert parser.error_message == (
        "stream disconnected before completion: stream closed before response.completed"
    )
    assert parser.final_message == "half an answer"
    assert parser.usage is None


def test_an_error_event_fails_the_run_even_without_turn_failed() -> None:
    parser = parse(
        line({"type": "thread.started", "thread_id": "t"}), line({"type": "error", "message": "boom"})
    )
    assert parser.failed and parser.error_message == "boom"


def test_a_retry_notice_followed_by_success_is_not_a_failure() -> None:
    parser = parse(
        line({"type": "error", "message": "Reconnecting... 1/5 (stream disconnected before completion)"}),
        line({"type": "item.completed", "item": {"id": "i", "type": "agent_message", "text": "ok"}}),
        line({"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 1}}),
    )
    assert not parser.failed and parser.error_message is None
    assert parser.retries == 1
    assert parser.final_message == "ok"


def test_waiting_for_network_is_a_retry_notice() -> None:
    notice = "Reconnecting... waiting for network (Connection failed: error sending request)"
    parser = parse(line({"type": "turn.started"}), line({"type": "error", "message": notice}))
    assert not parser.failed
    assert parser.retries == 1 and parser.last_retry_notice == notice


def test_turn_failed_without_message_still_reads_well() -> None:
    parser = parse(line({"type": "turn.failed", "error": {}}))
    assert parser.failed and parser.error_message == "codex reported a failed turn"


def test_junk_is_ignored() -> None:
    parser = parse(
        b"WARNING: not json\n",
        b"\n   \n",
        b"[1, 2]\n",
        b'{"no_type": true}\n',
        b"{broken json\n",
        b'{"type": "turn.started"}\n',
        b'{"type": "item.completed", "item": "not an object"}\n',
        b'{"type": "error", "message": "bad \xff\xfe bytes"}\n',
    )
    assert parser.events_seen == 3
    assert parser.failed and parser.error_message == "bad \ufffd\ufffd bytes"


def test_an_over_long_line_is_skipped_whole_and_parsing_resumes() -> None:
    huge = line({"type": "item.completed", "item": {"type": "agent_message", "text": "x" * 5000}})
    parser = CodexEventParser(max_line_bytes=1000)
    for start in range(0, len(huge), 700):
        parser.feed(huge[start : start + 700])
        assert len(parser._buffer) <= 1000
    parser.feed(line({"type": "item.completed", "item": {"type": "agent_message", "text": "short"}}))
    parser.close()
    assert parser.lines_skipped == 1
    assert parser.final_message == "short"


def test_a_last_line_without_newline_is_parsed_on_close() -> None:
    parser = CodexEventParser()
    parser.feed(b'{"type": "thread.started", "thread_id": "abc"}')
    assert parser.thread_id is None
    parser.close()
    assert parser.thread_id == "abc"


def test_commands_are_merged_by_item_id_and_capped() -> None:
    events = [line({"type": "item.started", "item": command_item("c0", "make", None, "in_progress")})]
    events.append(line({"type": "item.completed", "item": command_item("c0", "make", 2, "failed")}))
    events += [
        line({"type": "item.completed", "item": command_item(f"c{i}", f"cmd {i}", 0, "completed")})
        for i in range(1, 12)
    ]
    events.append(
        line({"type": "item.started", "item": command_item("late", "sleep 99", None, "in_progress")})
    )
    parser = parse(*events, max_entries=5)
    commands = parser.summary()["commands"]
    assert commands[0] == {"command": "make", "exit_code": 2}
    assert len(commands) == 5
    assert parser.entries_dropped == 8


def test_a_command_cut_short_has_no_exit_code() -> None:
    parser = parse(line({"type": "item.started", "item": command_item("c", "sleep 99", None, "in_progress")}))
    assert parser.summary()["commands"] == [{"command": "sleep 99", "exit_code": None}]


def test_file_changes_keep_one_entry_per_path() -> None:
    def change(changes: list[dict[str, str]], status: str = "completed") -> bytes:
        return line(
            {"type": "item.completed", "item": {"type": "file_change", "changes": changes, "status": status}}
        )

    parser = parse(
        change([{"path": "/w/new.py", "kind": "add"}]),
        change([{"path": "/w/new.py", "kind": "update"}, {"path": "/w/old.py", "kind": "update"}]),
        change([{"path": "/w/gone.py", "kind": "delete"}]),
        change([{"path": "/w/never.py", "kind": "add"}], status="failed"),
    )
    assert parser.summary()["files_changed"] == [
        {"path": "/w/new.py", "kind": "add"},
        {"path": "/w/old.py", "kind": "update"},
        {"path": "/w/gone.py", "kind": "delete"},
    ]


def test_usage_adds_up_over_turns() -> None:
    parser = parse(
        line({"type": "turn.completed", "usage": {"input_tokens": 10, "output_tokens": 2}}),
        line({"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 1, "odd": "x"}}),
    )
    assert parser.usage == {"input_tokens": 15, "output_tokens": 3}
    assert parser.turns_completed == 2


def test_error_items_are_warnings_not_failures() -> None:
    parser = parse(
        line({"type": "item.completed", "item": {"id": "e", "type": "error", "message": "config warning"}}),
        line({"type": "turn.completed", "usage": {}}),
    )
    assert not parser.failed
    assert parser.warnings == ["config warning"]


def test_on_event_sees_every_event_in_order() -> None:
    seen: list[str] = []
    parse(SAMPLE, on_event=lambda event: seen.append(event["type"]))
    assert seen == [json.loads(raw)["type"] for raw in SAMPLE.splitlines()]


def test_a_line_nested_a_thousand_deep_is_skipped_and_the_next_is_read() -> None:
    from codex_runner.execution.codex_events import CodexEventParser

    deep = b'{"type":"item.completed","item":{"type":"mcp_tool_call","result":' + b"[" * 5000
    deep += b"]" * 5000 + b"}}\n"
    parser = CodexEventParser()
    parser.feed(deep + b'{"type":"turn.failed","error":{"message":"boom"}}\n')
    assert parser.failed and parser.error_message == "boom"
    parser.feed(deep[:-1])
    parser.close()  # a last line without its newline: skipped too, no exception


def test_usage_and_file_paths_stay_bounded() -> None:
    import json

    from codex_runner.execution.codex_events import MAX_USAGE_KEYS, CodexEventParser

    parser = CodexEventParser()
    usage = {f"k{i}": 1 for i in range(10_000)}
    parser.feed(json.dumps({"type": "turn.completed", "usage": usage}).encode() + b"\n")
    change = {"path": "p" * 1_000_000, "kind": "add"}
    item = {"type": "file_change", "status": "completed", "changes": [change]}
    parser.feed(json.dumps({"type": "item.completed", "item": item}).encode() + b"\n")
    summary = parser.summary()
    assert len(summary["usage"]) == MAX_USAGE_KEYS
    assert len(summary["files_changed"][0]["path"]) <= 4097


def test_texts_are_redacted_before_they_are_cut() -> None:
    """A secret across the cut of a long command or message: cut first, what is left of it no
    longer matches, and its first characters would stay in `result.agent`."""
    secret = "Zq8xV3mN9pL2kR7tW4yB6cD1hJ5gF0sA"
    parser = CodexEventParser(redact=lambda text: text.replace(secret, "[REDACTED]"))
    command = "echo " + "x" * 3979 + " " + secret
    message = "y" * 99_990 + secret
    events = [
        {"type": "item.completed", "item": {"id": "c1", "type": "command_execution", "command": command}},
        {"type": "item.completed", "item": {"id": "m1", "type": "agent_message", "text": message}},
        {"type": "turn.failed", "error": {"message": "z" * 99_995 + secret}},
    ]
    parser.feed("".join(json.dumps(event) + "\n" for event in events).encode())
    summary = json.dumps(parser.summary())
    assert secret[:6] not in summary
    assert parser.commands[0]["command"].endswith(" [REDACTED]")


def test_an_event_of_an_unforeseen_shape_does_not_hide_the_turns_failure() -> None:
    """`"changes": 1` raised a TypeError in the parser, and the rest of the output chunk (the
    `turn.failed` among it) was never read: a failed run was recorded as a success."""
    lines = [
        {"type": "item.completed", "item": {"type": "file_change", "status": "completed", "changes": 1}},
        {"type": "error", "message": "the model refused"},
        {"type": "turn.failed", "error": {"message": "the model refused"}},
    ]
    parser = CodexEventParser()
    parser.feed(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    parser.close()
    assert parser.failed and parser.error_message == "the model refused"
    assert parser.events_failed == 0  # the shape is handled now, not merely survived

    def explode(event: dict[str, Any]) -> None:
        raise RuntimeError("a bug in an event's handling")

    parser = CodexEventParser()
    parser._handle_item = explode  # type: ignore[method-assign,assignment]
    parser.feed(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert parser.failed and parser.events_failed == 1


def test_usage_keys_are_plain_counter_names() -> None:
    """A key is shown as it is: a lone surrogate in one made every read of the job a 500, a token
    in one was not masked, a megabyte key made a megabyte summary."""
    token = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    parser = CodexEventParser(redact=lambda text: text.replace("abcdef0123456789", "[REDACTED]"))
    usage = {"\ud800": 1, token: 2, "x" * 100_000: 3, "input_tokens": 5, "abcdef0123456789": 7, "Output": 1}
    parser.feed(json.dumps({"type": "turn.completed", "usage": usage}).encode() + b"\n")
    parser.close()
    assert parser.summary()["usage"] == {"input_tokens": 5}


def test_an_agent_message_without_text_keeps_the_last_real_one() -> None:
    def message(item_id: str, **fields: Any) -> bytes:
        return line({"type": "item.completed", "item": {"id": item_id, "type": "agent_message", **fields}})

    parser = parse(
        message("m1", text="Added hello.txt."), message("m2"), message("m3", text=None), message("m4", text=7)
    )
    assert parser.summary()["final_message"] == "Added hello.txt."
    assert parse(message("m1", text="first"), message("m2", text="")).final_message == ""


def test_the_summary_stays_small_whatever_the_model_did() -> None:
    """The summary goes into the job row, and every job listing carries it: 500 commands, files
    and warnings each, of 3900 control characters (6 bytes each as JSON), made a 30 MB row."""
    long = "\x01" * 3900
    events = [
        line({"type": "item.completed", "item": command_item(f"c{i}", f"{long}{i}", 0, "completed")})
        for i in range(500)
    ]
    events += [
        line(
            {
                "type": "item.completed",
                "item": {
                    "id": f"f{i}",
                    "type": "file_change",
                    "status": "completed",
                    "changes": [{"path": f"/ws/{i}/{long}", "kind": "add"}],
                },
            }
        )
        for i in range(500)
    ]
    events += [
        line({"type": "item.completed", "item": {"type": "error", "message": f"{long}{i}"}})
        for i in range(500)
    ]
    parser = parse(*events)
    summary = parser.summary()
    size = len(json.dumps(summary))
    assert size <= 256 * 1024, size
    # The first entries are kept, and what was left out is counted.
    assert summary["commands"][0]["command"] == f"{long}0"
    kept = len(summary["commands"]) + len(summary["files_changed"]) + len(summary["warnings"])
    assert 0 < kept < 1500
    assert summary["entries_dropped"] == 1500 - kept
