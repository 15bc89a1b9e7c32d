"""Service logs (SPEC §8): structlog JSON lines (or console lines) on stderr, with the standard
library routed through the same chain so uvicorn and alembic lines look alike, and the runtime's own
secrets masked in every event, whoever logged it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from codex_runner.config import Settings
from codex_runner.secrets import mask

# Libraries that configure their own handlers: theirs are dropped so each line is written once.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "alembic", "sqlalchemy")


def mask_value(value: Any, secrets: Sequence[str]) -> Any:
    """`value` with every known secret masked in its strings, however deeply nested."""
    if not secrets:
        return value
    if isinstance(value, str):
        return mask(value, secrets)
    if isinstance(value, dict):
        return {k: mask_value(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(v, secrets) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else would be rendered with str() later: mask that text now.
    return mask(str(value), secrets)


class SecretMasker:
    """A structlog processor: the last word before rendering, so no processor can re-add a secret."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.secrets = [s for s in secrets if s]

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        return {k: mask_value(v, self.secrets) for k, v in event_dict.items()}


def configure_logging(settings: Settings, *, stream: Any = None, level: int = logging.INFO) -> None:
    """Configures structlog and the root logger once per process; calling it again reconfigures."""
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
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Off: tests and `serve` reconfigure in one process, and cached loggers would keep the old chain.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            SecretMasker(settings.secret_values()),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
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
