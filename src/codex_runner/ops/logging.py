"""Service logs (SPEC §8): structlog JSON lines (or console lines) on stderr, with the standard
library routed through the same chain so uvicorn and alembic lines look alike, and the runtime's own
secrets masked in every event, whoever logged it."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from codex_runner.config import Settings
from codex_runner.secrets import Masker

# Libraries that configure their own handlers: theirs are dropped so each line is written once.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "alembic", "sqlalchemy")


def mask_value(value: Any, secrets: Masker | Sequence[str]) -> Any:
    """`value` with every known secret masked in its strings, however deeply nested."""
    masker = secrets if isinstance(secrets, Masker) else Masker(secrets)
    return _masked(value, masker) if masker else value


def _masked(value: Any, masker: Masker) -> Any:
    if isinstance(value, str):
        return masker(value)
    if isinstance(value, dict):
        return {k: _masked(v, masker) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v, masker) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else would be rendered with str() later: mask that text now.
    return masker(str(value))


class SecretMasker:
    """A structlog processor: the last word before rendering, so no processor can re-add a secret."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.masker = Masker(secrets)

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        if not self.masker:
            return event_dict
        return {k: _masked(v, self.masker) for k, v in event_dict.items()}


class HandlerLogger:
    """What structlog's own lines are written with: the rendered line goes straight to the root
    handler's stream, under that handler's lock, as the standard library's lines do. No
    `LogRecord` and no second pass through a formatter per line: with the secrets' encodings worked
    out once (`Masker`), the service log line of a job's end costs a third of the CPU it did
    (bench/drain_inprocess.py --parts)."""

    def __init__(self, handler: logging.StreamHandler[Any], name: str | None = None) -> None:
        self.name = name or ""  # for `add_logger_name`
        self._handler = handler

    def msg(self, message: str) -> None:
        handler = self._handler
        handler.acquire()
        try:
            # As logging.StreamHandler.emit: a broken or closed stream never fails the caller.
            with contextlib.suppress(OSError, ValueError):
                handler.stream.write(message + handler.terminator)
                handler.stream.flush()
        finally:
            handler.release()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def configure_logging(settings: Settings, *, stream: Any = None, level: int = logging.INFO) -> None:
    """Configures structlog and the root logger once per process; calling it again reconfigures.

    Lines logged through structlog (the runner's own) are rendered by structlog's chain and written
    by `HandlerLogger`; lines of the standard library (uvicorn, alembic) go through the root handler,
    whose formatter runs the same processors. Both end with the secret masker and the renderer."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    renderer: Processor
    if settings.log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False, default=str)
    last: list[Processor] = [
        structlog.processors.format_exc_info,
        SecretMasker(settings.secret_values()),
        renderer,
    ]
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)

    def logger_factory(*args: Any) -> HandlerLogger:
        return HandlerLogger(handler, args[0] if args else None)

    structlog.configure(
        processors=[*shared, *last],
        logger_factory=logger_factory,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Off: tests and `serve` reconfigure in one process, and cached loggers would keep the old chain.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last],
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers = []
        foreign.propagate = True
    # SQLAlchemy echoes statements at INFO when asked; its parameters could hold anything.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
