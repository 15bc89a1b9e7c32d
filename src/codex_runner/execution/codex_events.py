"""Live parser of `codex exec --json` standard output (JSON Lines, one event per line).

codex 0.169 prints `thread.started`, `turn.started`, `item.started` / `item.updated` /
`item.completed` (items: `agent_message`, `command_execution`, `file_change`, `reasoning`,
`todo_list`, `mcp_tool_call`, `web_search`, `error`), then `turn.completed` (with `usage`) or
`turn.failed`, and top-level `error` events. docs/codex.md shows real lines.

The parser is fed raw bytes as they arrive, at any chunk boundary, and keeps bounded memory: an
over-long line is skipped whole, and the lists it collects are capped. A `turn.failed` or a fatal
`error` event marks the run failed even when codex exits 0; codex's own retry notices ("Reconnecting... 1/5 (...)",
"Reconnecting... waiting for network (...)") are also `error` events but are only counted, since
codex may still recover.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("codex_runner.codex")

MAX_LINE_BYTES = 1024 * 1024
MAX_ENTRIES = 500
MAX_TEXT_CHARS = 100_000
MAX_USAGE_KEYS = 32
# The summary goes into the job row, and every job listing carries it: each of its lists keeps its
# first entries up to this much JSON (as stored: non-ASCII and control characters escaped, up to 6
# bytes each). 500 entries of a few thousand characters made rows of tens of MB.
MAX_LIST_JSON_BYTES = 64 * 1024
_USAGE_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")

# codex reports each retry of a model request as an `error` event with this prefix: "n/m" for a
# failed stream, "waiting for network" (with no end: codex never gives up) for a refused connection.
_RETRY_NOTICE = re.compile(r"^Reconnecting\.\.\.")


def _text(value: Any, limit: int = MAX_TEXT_CHARS) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= limit else value[:limit] + "…"


def _within_budget(entries: list[Any]) -> list[Any]:
    """The first `entries` whose JSON, with a separator each, fits in `MAX_LIST_JSON_BYTES`."""
    used = 2  # the brackets
    for index, entry in enumerate(entries):
        used += len(json.dumps(entry)) + 2
        if used > MAX_LIST_JSON_BYTES:
            return entries[:index]
    return entries


class CodexEventParser:
    """Incremental parser of codex's JSON-lines events; see the module docstring.

    `on_event`, if given, is called with every parsed event, in order, from inside `feed`.
    """

    def __init__(
        self,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_entries: int = MAX_ENTRIES,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        self._max_line_bytes = max_line_bytes
        self._redact = redact
        self._max_entries = max_entries
        self._on_event = on_event
        self._buffer = bytearray()
        # True while skipping the rest of a line that already exceeded the limit.
        self._discarding = False

        self.thread_id: str | None = None
        self.final_message: str | None = None
        self.usage: dict[str, int] | None = None
        self.commands: list[dict[str, Any]] = []
        self._command_index: dict[str, int] = {}
        self._files: dict[str, str] = {}
        self.warnings: list[str] = []
        self.retries = 0
        self.last_retry_notice: str | None = None
        self.turns_completed = 0
        self.events_seen = 0
        self.events_failed = 0  # events whose handling raised (`_parse_line`)
        self.lines_skipped = 0
        self.entries_dropped = 0
        self._error: str | None = None
        self._failed = False

    @property
    def failed(self) -> bool:
        """True once codex reported a failed turn or a fatal error."""
        return self._failed

    @property
    def error_message(self) -> str | None:
        """The message of the failure, as codex worded it; None unless `failed`."""
        return self._error if self._failed else None

    def feed(self, chunk: bytes) -> None:
        """Consume the next piece of standard output; complete lines are parsed at once."""
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                self._append(chunk[start:])
                return
            self._append(chunk[start:newline])
            try:
                if not self._discarding:
                    self._parse_line(bytes(self._buffer))
            finally:  # whatever the line did, the next one starts clean
                self._buffer.clear()
                self._discarding = False
            start = newline + 1

    def close(self) -> None:
        """End of output: a last line without a newline is parsed too."""
        try:
            if self._buffer and not self._discarding:
                self._parse_line(bytes(self._buffer))
        finally:
            self._buffer.clear()
            self._discarding = False

    def summary(self) -> dict[str, Any]:
        """What the run did, as plain JSON-ready data; each list within `MAX_LIST_JSON_BYTES`
        (the entries left out are counted in `entries_dropped`)."""
        commands = _within_budget([dict(c) for c in self.commands])
        files = _within_budget([{"path": path, "kind": kind} for path, kind in self._files.items()])
        warnings = _within_budget(list(self.warnings))
        over_budget = len(self.commands) + len(self._files) + len(self.warnings)
        over_budget -= len(commands) + len(files) + len(warnings)
        return {
            "thread_id": self.thread_id,
            "final_message": self.final_message,
            "usage": dict(self.usage) if self.usage is not None else None,
            "commands": commands,
            "files_changed": files,
            "failed": self._failed,
            "error": self.error_message,
            "warnings": warnings,
            "retries": self.retries,
            "entries_dropped": self.entries_dropped + over_budget,
        }

    def _append(self, data: bytes) -> None:
        if self._discarding or not data:
            return
        if len(self._buffer) + len(data) > self._max_line_bytes:
            self._buffer.clear()
            self._discarding = True
            self.lines_skipped += 1
            return
        self._buffer += data

    def _parse_line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"{"):
            return
        try:
            event = json.loads(line.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):  # RecursionError: a line nested a thousand deep
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return
        self.events_seen += 1
        try:
            self._handle(event)
        except Exception:
            # An event of a shape not foreseen costs that event only: the rest of the output, a
            # `turn.failed` among it, is still read.
            self.events_failed += 1
            log.warning("codex_event_not_understood", event_type=event["type"][:64])
        if self._on_event is not None:
            self._on_event(event)

    def _text(self, value: Any, limit: int = MAX_TEXT_CHARS) -> str | None:
        """`value` if it is a string, redacted whole and then cut to `limit` characters: cut first,
        a secret at the cut would no longer match anything, and its first part would be kept."""
        if not isinstance(value, str):
            return None
        return _text(value if self._redact is None else self._redact(value), limit)

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "thread.started":
            self.thread_id = self._text(event.get("thread_id"), 200)
        elif kind in ("item.started", "item.updated", "item.completed"):
            item = event.get("item")
            if isinstance(item, dict):
                self._handle_item(item, completed=kind == "item.completed")
        elif kind == "turn.completed":
            self.turns_completed += 1
            self._add_usage(event.get("usage"))
        elif kind == "turn.failed":
            error = event.get("error")
            message = self._text(error.get("message")) if isinstance(error, dict) else None
            self._fail(message or "codex reported a failed turn")
        elif kind == "error":
            message = self._text(event.get("message")) or "codex reported an error"
            if _RETRY_NOTICE.match(message):
                self.retries += 1
                self.last_retry_notice = message
            else:
                self._fail(message)

    def _handle_item(self, item: dict[str, Any], *, completed: bool) -> None:
        item_type = item.get("type")
        if item_type == "command_execution":
            self._record_command(item)
        elif item_type == "file_change" and completed and item.get("status") != "failed":
            changes = item.get("changes")
            for change in changes if isinstance(changes, list) else []:
                if isinstance(change, dict):
                    self._record_file(change.get("path"), change.get("kind"))
        elif item_type == "agent_message" and completed:
            # A message without text (a shape this parser does not know) says nothing: the last
            # real answer stays the final one, rather than becoming null.
            text = self._text(item.get("text"))
            if text is not None:
                self.final_message = text
        elif item_type == "error" and completed:
            # Item-level errors are warnings codex carried on from; the turn's outcome decides.
            message = self._text(item.get("message"), 2000)
            if message is not None:
                self._bounded_append(self.warnings, message)

    def _record_command(self, item: dict[str, Any]) -> None:
        command = self._text(item.get("command"), 4000)
        if command is None:
            return
        exit_code = item.get("exit_code")
        entry = {"command": command, "exit_code": exit_code if isinstance(exit_code, int) else None}
        # The same item arrives as started (no exit code yet) and again as completed.
        item_id = item.get("id")
        key = item_id if isinstance(item_id, str) else None
        if key is not None and key in self._command_index:
            self.commands[self._command_index[key]] = entry
            return
        if self._bounded_append(self.commands, entry) and key is not None:
            self._command_index[key] = len(self.commands) - 1

    def _record_file(self, path: Any, kind: Any) -> None:
        path, kind = self._text(path, 4096), self._text(kind, 40)
        if path is None or kind is None:
            return
        previous = self._files.get(path)
        if previous is None and len(self._files) >= self._max_entries:
            self.entries_dropped += 1
            return
        # A file this run created stays "add" however often it is edited afterwards.
        self._files[path] = "add" if previous == "add" and kind == "update" else kind

    def _add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        # One `codex exec` normally runs one turn; should it run several, their usage adds up.
        total = self.usage if self.usage is not None else {}
        for key, value in usage.items():
            # A few counters (input, cached, output tokens …): a line of a million keys must not
            # make a summary of a million. Named like counters, or dropped: a key is shown as it
            # is (a lone surrogate in one made every read of the job a 500, a token in one was
            # not masked), so it must be a plain name that redaction leaves alone.
            fits = key in total or len(total) < MAX_USAGE_KEYS
            plain = isinstance(key, str) and _USAGE_KEY.fullmatch(key) is not None
            if plain and self._redact is not None and self._redact(key) != key:
                plain = False
            if plain and isinstance(value, int) and not isinstance(value, bool) and fits:
                total[key] = total.get(key, 0) + value
        self.usage = total

    def _fail(self, message: str) -> None:
        self._failed = True
        self._error = message

    def _bounded_append(self, target: list[Any], value: Any) -> bool:
        if len(target) >= self._max_entries:
            self.entries_dropped += 1
            return False
        target.append(value)
        return True
