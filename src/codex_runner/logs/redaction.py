"""Versioned redaction rule sets for log reading (SPEC §5 "Redaction on read").

A rule set turns raw log lines into redacted lines. It is pure and deterministic: the same lines in
the same rule state always give the same bytes, however the input was cut into whole-line chunks.
That property is what makes redacted offsets stable, so a published version is never edited: a
change of any rule is a new version (``"v2"``) registered beside the old one.

Speed comes from a prefilter: every rule's match contains a match of one of its ``needles`` (short
regexes opening with a literal, which the regex engine searches at GB/s), so only lines holding a
needle go through the rules, and only through the rules that needle stands for. The only state crossing lines is "inside a PEM private key block".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from codex_runner.errors import InvalidRequest

# After this many lines a PEM block without its END line is taken as bogus and output resumes;
# the largest private keys (RSA 16384) are about 200 base64 lines.
MAX_PEM_LINES = 256

_PEM_BEGIN = b"-----BEGIN"
_PEM_BEGIN_RE = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_END_RE = re.compile(rb"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_RULE = "private_key"


@dataclass(frozen=True)
class Rule:
    """``pattern`` masks its ``(?P<s>…)`` groups (or the whole match if it has none) and never
    spans lines. Every match must contain a match of one of ``needles``: small regexes opening with
    a literal (fast to search), run on the lower-cased text, or on the text itself if ``cased``."""

    name: str
    pattern: bytes
    needles: tuple[bytes, ...]
    cased: bool = False


@dataclass(frozen=True)
class CutGuard:
    """How a rule set's stream cuts lines over 64 KiB (logs/stream.py) so no match is split: the cut
    is sought ``lookahead`` bytes before 64 KiB, so the rules see that many bytes past it, and
    moves back before any match spanning it that starts at most ``lookback`` bytes earlier."""

    lookahead: int
    lookback: int


def _marker(rule: str) -> bytes:
    return b"[REDACTED:" + rule.encode() + b"]"


class RuleSet:
    """One published redaction version: line rules plus PEM private key blocks."""

    def __init__(self, version: str, rules: tuple[Rule, ...], cut_guard: CutGuard | None = None) -> None:
        self.version = version
        self.rules = rules
        # None: long lines are cut at a separator only (v1), which can split a secret.
        self.cut_guard = cut_guard
        self._markers: dict[str, bytes] = {}
        self._alternatives: list[bytes] = []
        for index, rule in enumerate(rules):
            pattern = rule.pattern if b"(?P<s>" in rule.pattern else b"(?P<s>" + rule.pattern + b")"
            parts = pattern.split(b"(?P<s>")
            named = parts[0]
            for i, part in enumerate(parts[1:]):
                group = f"r{index}_{i}"
                self._markers[group] = _marker(rule.name)
                named += b"(?P<" + group.encode() + b">" + part
            self._alternatives.append(named)
        needles: dict[tuple[bytes, bool], set[int]] = {}
        for index, rule in enumerate(rules):
            for needle in rule.needles:
                needles.setdefault((needle, rule.cased), set()).add(index)
        self._needles = tuple(
            (re.compile(needle), cased, frozenset(ids)) for (needle, cased), ids in sorted(needles.items())
        )
        self._regexes: dict[frozenset[int], re.Pattern[bytes]] = {}
        digest = hashlib.sha256(version.encode())
        for rule in rules:
            digest.update(rule.name.encode() + b"\0" + rule.pattern + b"\0" + b"\0".join(rule.needles))
        digest.update(f"{MAX_PEM_LINES}".encode() + _PEM_BEGIN_RE.pattern + _PEM_END_RE.pattern)
        if cut_guard is not None:
            digest.update(f"cut:{cut_guard.lookahead}:{cut_guard.lookback}".encode())
        self.fingerprint = digest.digest()[:16]

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Where in ``data`` (part of one line) a cut would split what the rules mask: the whole
        match of every rule (key and value: a value cut from its key is no longer recognised), and
        each ``-----BEGIN`` up to the end of its END marker, or of ``data``. Start order."""
        lower = data.lower()
        rules: frozenset[int] = frozenset()
        for needle, cased, ids in self._needles:
            if needle.search(data if cased else lower):
                rules |= ids
        found = [match.span() for match in self._regex(rules).finditer(data)] if rules else []
        begin = data.find(_PEM_BEGIN)
        while begin >= 0:
            end = _PEM_END_RE.search(data, begin)
            stop = end.end() if end is not None else len(data)
            found.append((begin, stop))
            begin = data.find(_PEM_BEGIN, stop)
        return sorted(found)

    def redact(self, data: bytes, state: int = 0) -> tuple[bytes, int]:
        """Redacts whole lines (each ends with ``\\n``; the last may be a cut piece without one).
        ``state`` is the PEM state before ``data`` (0: outside a block); returns the redacted,
        valid UTF-8 bytes and the state after them."""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            if state:
                pos, state = self._inside_pem(data, pos, state, out)
                continue
            begin = data.find(_PEM_BEGIN, pos)
            if begin < 0:
                out.append(self._redact_lines(data[pos:]))
                break
            line_start = max(pos, data.rfind(b"\n", pos, begin) + 1)
            line_end = _line_end(data, begin)
            out.append(self._redact_lines(data[pos:line_start]))
            text, state = self._begin_line(data[line_start:line_end])
            out.append(text)
            pos = line_end
        return _valid_utf8(b"".join(out)), state

    def _begin_line(self, line: bytes) -> tuple[bytes, int]:
        """A line holding ``-----BEGIN``: everything from a private key's BEGIN marker to its END
        marker (or to the end of the line) becomes one marker; a BEGIN alone on its line opens a
        multi-line block."""
        out: list[bytes] = []
        while True:
            begin = _PEM_BEGIN_RE.search(line)
            if begin is None:
                out.append(self._redact_lines(line))
                return b"".join(out), 0
            out.append(self._redact_lines(line[: begin.start()]))
            out.append(_marker(_PEM_RULE))
            rest = line[begin.end() :]
            end = _PEM_END_RE.search(rest)
            if end is not None:
                line = rest[end.end() :]
                continue
            newline = b"\n" if line.endswith(b"\n") else b""
            out.append(newline)
            return b"".join(out), 1 if rest.strip() == b"" else 0

    def _inside_pem(self, data: bytes, pos: int, state: int, out: list[bytes]) -> tuple[int, int]:
        """Drops the lines of an open block up to and including its END marker; what follows the
        marker on that line is redacted as usual."""
        while pos < len(data):
            if state > MAX_PEM_LINES:
                return pos, 0
            line_end = _line_end(data, pos)
            end = _PEM_END_RE.search(data, pos, line_end)
            if end is not None:
                rest = data[end.end() : line_end]
                if rest.strip():
                    text, state = self._begin_line(rest)
                    out.append(text)
                    return line_end, state
                return line_end, 0
            state += 1
            pos = line_end
        return pos, state

    def _redact_lines(self, data: bytes) -> bytes:
        """Runs, on each line holding a needle, the rules that needle stands for. Rules whose needles
        a line lacks cannot match it, so this equals the full combined regex on every line."""
        if not data:
            return data
        lower = data.lower()
        lines: dict[int, tuple[int, frozenset[int]]] = {}
        for needle, cased, rules in self._needles:
            text = data if cased else lower
            hit = needle.search(text)
            while hit is not None:
                start = data.rfind(b"\n", 0, hit.start()) + 1
                stop, found = lines.get(start, (0, frozenset()))
                stop = stop or _line_end(data, hit.start())
                lines[start] = (stop, found | rules)
                hit = needle.search(text, stop)
        if not lines:
            return data
        out: list[bytes] = []
        pos = 0
        for start in sorted(lines):
            stop, rules = lines[start]
            out.append(data[pos:start])
            out.append(self._regex(rules).sub(self._mask, data[start:stop]))
            pos = stop
        out.append(data[pos:])
        return b"".join(out)

    def _regex(self, rules: frozenset[int]) -> re.Pattern[bytes]:
        """The combined regex of some rules, in rule order, so the leftmost-first choice among them
        is the same as in the full set; there are few distinct subsets, each compiled once."""
        regex = self._regexes.get(rules)
        if regex is None:
            regex = re.compile(b"|".join(self._alternatives[i] for i in sorted(rules)))
            self._regexes[rules] = regex
        return regex

    def _mask(self, match: re.Match[bytes]) -> bytes:
        group = match.lastgroup
        assert group is not None  # every alternative ends with its named group
        whole, base = match.group(), match.start()
        start, stop = match.span(group)
        return whole[: start - base] + self._markers[group] + whole[stop - base :]


def _line_end(data: bytes, pos: int) -> int:
    newline = data.find(b"\n", pos)
    return len(data) if newline < 0 else newline + 1


def _valid_utf8(data: bytes) -> bytes:
    """Invalid UTF-8 becomes U+FFFD. Decoding is per line-safe: a newline always ends a sequence."""
    if data.isascii():
        return data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").encode("utf-8")
    return data


_TOKEN = rb"[A-Za-z0-9_-]"
# Each pattern opens with a literal or a small character class (boundary look-behinds come after
# it): that lets the regex engine skip ahead fast instead of trying every rule at every byte.
_ASSIGNED = (
    rb"(?:\\?[\"'])?[ \t]*(?:=(?!=)|:)[ \t]*(?:"
    rb"\\\"(?P<s>[^\"\\\n]+)\\\"|\"(?P<s>(?:[^\"\\\n]|\\.)+)\"|'(?P<s>[^'\n]+)'"
    # a bare value: no quotes, brackets, separators or backslashes (the end of a value inside an
    # escaped JSON string); not a type annotation, a literal, a call, a subscript or a variable reference
    rb"|(?!(?:null|None|true|false|True|False|undefined|str|int|bool|bytes|string|Optional|SecretStr)\b)"
    rb"(?![A-Za-z_][A-Za-z0-9_.]*[(\[])(?!\$)(?P<s>[^\s\"'`,;&<>()\[\]{}\\]+))"
)
_ASSIGNMENT = "secret_assignment"
# One needle search serves both rules.
_AWS_OR_GOOGLE = rb"A(?:KIA|SIA|Iza)"

V1 = RuleSet(
    "v1",
    (
        Rule("anthropic_key", rb"sk-ant-(?<![\w-]sk-ant-)" + _TOKEN + rb"{20,}", (rb"sk-",)),
        Rule("openai_key", rb"sk-(?<![\w-]sk-)(?:proj-|svcacct-|admin-)?" + _TOKEN + rb"{20,}", (b"sk-",)),
        Rule(
            "github_token",
            rb"gh[pousr]_(?<!\wgh[pousr]_)[A-Za-z0-9]{30,}|github_pat_(?<!\wgithub_pat_)\w{30,}",
            (rb"g(?:h[pousr]_|ithub_pat_)",),
        ),
        Rule("gitlab_token", rb"glpat-(?<![\w-]glpat-)" + _TOKEN + rb"{20,}", (rb"glpat-",)),
        Rule("slack_token", rb"xox[abprs]-(?<![\w-]xox[abprs]-)[A-Za-z0-9-]{10,}", (rb"xox[abprs]-",)),
        Rule(
            "slack_webhook", rb"https://hooks\.slack\.com/(?:services|workflows|triggers)/[\w/-]+", (rb"://",)
        ),
        Rule(
            "webhook_url",
            rb"https://(?:(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/|[\w.-]+\.webhook\.office\.com/"
            rb"|hooks\.zapier\.com/hooks/|[\w.-]+\.logic\.azure\.com(?::\d+)?/workflows/)[^\s\"'<>`\\]+",
            (rb"://",),
        ),
        Rule(
            "aws_access_key",
            rb"A(?:KIA|SIA)(?<![A-Z0-9]A[KS]IA)[A-Z0-9]{16}(?![A-Z0-9])",
            (_AWS_OR_GOOGLE,),
            cased=True,
        ),
        Rule(
            "aws_secret_key",
            rb"[Aa](?i:ws_?secret_?access_?key)(?:\\?[\"'])?[ \t]*[:=][ \t]*(?:\\?[\"'])?"
            rb"(?P<s>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])",
            (rb"secret",),
        ),
        Rule("google_api_key", rb"AIza" + _TOKEN + rb"{35}", (_AWS_OR_GOOGLE,), cased=True),
        Rule("google_oauth", rb"ya29\." + _TOKEN + rb"{20,}", (rb"ya29\.",)),
        Rule(
            "jwt",
            rb"eyJ" + _TOKEN + rb"{8,}\." + _TOKEN + rb"{8,}\." + _TOKEN + rb"{8,}",
            (rb"eyJ",),
            cased=True,
        ),
        Rule(
            "authorization_header",
            rb"[Aa](?i:uthorization)(?:\\?[\"'])?[ \t]*[:=][ \t]*(?:\\?[\"'])?(?i:bearer|basic|token)[ \t]+"
            rb"(?P<s>[A-Za-z0-9._~+/=-]+)",
            (rb"authorization",),
        ),
        Rule("bearer_token", rb"[Bb](?i:earer)[ \t]+(?P<s>[A-Za-z0-9._~+/-]{20,}=*)", (rb"bearer",)),
        Rule("url_credentials", rb"://(?P<s>[^\s/?#@:\"'<>`\\]+:[^\s/?#\"'<>`\\]+)@", (rb"://",)),
        Rule(_ASSIGNMENT, rb"[Pp](?i:assw(?:or)?d)" + _ASSIGNED, (rb"passw(?:or)?d",)),
        Rule(_ASSIGNMENT, rb"[Ss](?i:ecret(?:[_-]?key)?)" + _ASSIGNED, (rb"secret",)),
        Rule(_ASSIGNMENT, rb"[Tt](?i:oken)" + _ASSIGNED, (rb"token[\\\"' \t=:]",)),
        Rule(_ASSIGNMENT, rb"[Aa](?i:pi[_-]?key)" + _ASSIGNED, (rb"api[_-]?key",)),
    ),
)

# v1's rules; lines over 64 KiB are cut where no match is split (v1 could cut `Bearer <token>` or
# `password = value` in two, and neither half was recognised).
V2 = RuleSet("v2", V1.rules, cut_guard=CutGuard(lookahead=16 * 1024, lookback=12 * 1024))

# v2's rules, but `url_credentials` also takes an empty user name: `redis://:password@host`, the
# usual form of a Redis URL, kept its password in v2.
_URL_CREDENTIALS_V3 = Rule(
    "url_credentials", rb"://(?P<s>[^\s/?#@:\"'<>`\\]*:[^\s/?#\"'<>`\\]+)@", (rb"://",)
)
V3 = RuleSet(
    "v3",
    tuple(_URL_CREDENTIALS_V3 if rule.name == "url_credentials" else rule for rule in V2.rules),
    cut_guard=V2.cut_guard,
)

# v3's rules, and tokens and webhooks of Slack and Teams that v3 let through: Slack app-level
# tokens (`xapp-…`), refresh and rotating tokens (`xoxe-…`, `xoxe.xoxp-…`), and the legacy Teams
# webhook host (`outlook.office.com/webhook/…`, `outlook.office365.com/webhook/…`).
_V4_CHANGED = {
    "slack_token": Rule(
        "slack_token",
        rb"(?:xox[abeprs]|xapp)-(?<![\w-]xox[abeprs]-)(?<![\w-]xapp-)[A-Za-z0-9-]{10,}"
        rb"|xoxe\.(?<![\w-]xoxe\.)xox[bp]-[A-Za-z0-9-]{10,}",
        (rb"xox[abeprs][-.]|xapp-",),
    ),
    "webhook_url": Rule(
        "webhook_url",
        rb"https://(?:(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/|[\w.-]+\.webhook\.office\.com/"
        rb"|outlook\.office(?:365)?\.com/webhook/"
        rb"|hooks\.zapier\.com/hooks/|[\w.-]+\.logic\.azure\.com(?::\d+)?/workflows/)[^\s\"'<>`\\]+",
        (rb"://",),
    ),
}
V4 = RuleSet("v4", tuple(_V4_CHANGED.get(rule.name, rule) for rule in V3.rules), cut_guard=V3.cut_guard)

REDACTION_VERSION = V4.version
RULESETS: dict[str, RuleSet] = {V1.version: V1, V2.version: V2, V3.version: V3, V4.version: V4}


def get_ruleset(version: str) -> RuleSet:
    try:
        return RULESETS[version]
    except KeyError:
        known = ", ".join(sorted(RULESETS))
        raise InvalidRequest(
            f"unknown redaction version {version!r} (known: {known})", code="unknown_redaction_version"
        ) from None
