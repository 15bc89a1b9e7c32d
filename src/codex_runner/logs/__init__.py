"""Job logs: the raw writer, versioned redaction rule sets, and paged reading of the redacted log."""

from codex_runner.logs.reader import LogPage, read_page, redacted_size
from codex_runner.logs.redaction import REDACTION_VERSION, RULESETS, RuleSet, get_ruleset
from codex_runner.logs.writer import LogWriter

__all__ = [
    "REDACTION_VERSION",
    "RULESETS",
    "LogPage",
    "LogWriter",
    "RuleSet",
    "get_ruleset",
    "read_page",
    "redacted_size",
]
