"""v1 redaction rules (v2 shares them): each with inputs it must mask and look-alikes it must leave alone."""

from __future__ import annotations

import pytest

from codex_runner.errors import InvalidRequest
from codex_runner.logs.redaction import (
    MAX_PEM_LINES,
    REDACTION_VERSION,
    RULESETS,
    V1,
    V2,
    V3,
    V4,
    get_ruleset,
)

GH = "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


def redact(text: str) -> str:
    out, state = V1.redact(text.encode() + b"\n")
    assert state == 0
    return out.decode()[:-1]


POSITIVE = [
    ("openai_key", "key sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz12345 end", "sk-proj-Ab3d"),
    ("openai_key", "export K=x sk-Ab3dEf6hIj9kLmN0pQrStUvWxYz", "Ab3dEf6hIj9k"),
    ("anthropic_key", "using sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123 now", "abcdefghij"),
    ("github_token", f"token ghp_{GH} end", GH),
    ("github_token", f"gho_{GH}", GH),
    ("github_token", f"x ghs_{GH}", GH),
    ("github_token", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "11ABCDEFG0123"),
    ("gitlab_token", "GL glpat-abcdefghij0123456789xyz", "abcdefghij0123"),
    ("slack_token", "xoxb-1234567890-abcdefghij", "1234567890-abc"),
    ("slack_token", "xoxp-1234567890-abcdefghij", "1234567890-abc"),
    ("slack_webhook", "post https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXX", "T000/B000"),
    ("webhook_url", "https://discord.com/api/webhooks/123456/abcdefTOKEN", "abcdefTOKEN"),
    ("webhook_url", "https://acme.webhook.office.com/webhookb2/abc-123@def/IncomingWebhook/x", "abc-123"),
    ("aws_access_key", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "IOSFODNN7EXAMPLE"),
    ("aws_access_key", "ASIAIOSFODNN7EXAMPLE", "IOSFODNN7EXAMPLE"),
    ("aws_secret_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtn"),
    ("aws_secret_key", 'AWS_SECRET_ACCESS_KEY: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', "wJalrXUtn"),
    ("google_api_key", "key=AIzaSyA1234567890abcdefghijklmnopqrstuv", "SyA1234567890"),
    ("google_oauth", "ya29.a0AfH6SMBabcdefghijklmnopqrstuvwxyz", "a0AfH6SMB"),
    ("jwt", f"cookie: session={JWT}", "dozjgNryP4J3"),
    ("authorization_header", 'curl -H "Authorization: Bearer abc.def-ghi"', "abc.def-ghi"),
    ("authorization_header", "authorization: basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNz"),
    ("authorization_header", "{'Authorization': 'Bearer qwertyuiop'}", "qwertyuiop"),
    ("bearer_token", "using bearer abcdefghijklmnopqrstuvwxyz012345", "abcdefghijklmn"),
    ("url_credentials", "remote: https://user:hunter2hunter2@github.com/o/r.git", "hunter2hunter2"),
    ("url_credentials", "postgresql://app:p@ss@db:5432/x", "p@ss"),
    ("secret_assignment", "password=hunter2", "hunter2"),
    ("secret_assignment", "DB_PASSWORD: s3cr3t!", "s3cr3t!"),
    ("secret_assignment", '{"password": "correct horse battery", "user": "bob"}', "correct horse"),
    ("secret_assignment", "client_secret = 'abc def'", "abc def"),
    ("secret_assignment", "GITHUB_TOKEN=abcdef123", "abcdef123"),
    ("secret_assignment", "?access_token=abc123&x=1", "abc123"),
    ("secret_assignment", "X-Api-Key: 0123456789abcdef", "0123456789abcdef"),
    ("secret_assignment", "apikey=zzzyyyxxx", "zzzyyyxxx"),
    ("secret_assignment", 'SECRET_KEY = "django-insecure-xyz"', "django-insecure"),
    ("secret_assignment", r'"aggregated_output": "{\"password\": \"hunter2\"}"', "hunter2"),
    ("secret_assignment", r"env: passwd=hunter2\nnext", "hunter2"),
]

NEGATIVE = [
    "sk-short and risk-assessment-of-the-whole-framework-here",
    "task-abcdefghijklmnopqrstuvwxyz0123456789",
    f"xghp_{GH}",
    "ghp_short",
    "glpat-short",
    "xoxz-1234567890-abcdefghij",
    "https://hooks.example.com/services/T000/B000",
    "https://docs.github.com/en/webhooks/using-webhooks",
    "AKIAIOSFODNN7EXAMPL",
    "XAKIAIOSFODNN7EXAMPLE",
    "aws_secret_access_key = short",
    "AIzaShort",
    "ya29.short",
    "eyJhbGciOiJIUzI1NiJ9 alone",
    "Authorization: required",
    "the bearer of bad news",
    "ssh://git@github.com/o/r.git",
    "http://localhost:8080/path?q=1",
    "git@github.com:o/r.git",
    "def login(password: str, token: Optional[str] = None) -> bool:",
    "token = get_token(request)",
    "if password == other:",
    'password = os.environ["DB_PASSWORD"]',
    "password=${DB_PASSWORD}",
    "password: null",
    '"input_tokens": 24763, "max_tokens": 100, "token_count": 3',
    "tokenizer=bpe secretary=alice passwords_checked=3",
    "PWD=/home/user",
    "-----BEGIN CERTIFICATE-----",
    "café ✓ — 日本語",
]


@pytest.mark.parametrize(("rule", "text", "secret"), POSITIVE)
def test_rule_masks(rule: str, text: str, secret: str) -> None:
    out = redact(text)
    assert f"[REDACTED:{rule}]" in out
    assert secret not in out


@pytest.mark.parametrize("text", NEGATIVE)
def test_rule_leaves_lookalikes(text: str) -> None:
    assert redact(text) == text


def test_every_rule_has_a_positive_example() -> None:
    assert {rule.name for rule in V1.rules} <= {rule for rule, _, _ in POSITIVE}


def test_kept_context_around_masked_value() -> None:
    assert redact("url https://u:pw@host/x") == "url https://[REDACTED:url_credentials]@host/x"
    assert redact('{"password": "p w"}') == '{"password": "[REDACTED:secret_assignment]"}'
    assert redact("Authorization: Bearer xyz") == "Authorization: Bearer [REDACTED:authorization_header]"


PEM = b"key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nAbCdEf==\n-----END RSA PRIVATE KEY-----\nafter\n"


def test_pem_block_masked_whole() -> None:
    out, state = V1.redact(PEM)
    assert out == b"key:\n[REDACTED:private_key]\nafter\n"
    assert state == 0


def test_pem_block_state_crosses_chunks() -> None:
    lines = PEM.splitlines(keepends=True)
    out, state = [], 0
    for line in lines:
        text, state = V1.redact(line, state)
        out.append(text)
    assert b"".join(out) == V1.redact(PEM)[0]


def test_pem_single_line_escaped() -> None:
    text = r'"k": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA\n-----END OPENSSH PRIVATE KEY-----\n" ok'
    assert redact(text) == r'"k": "[REDACTED:private_key]\n" ok'


def test_pem_begin_with_text_after_masks_rest_of_line_only() -> None:
    out, state = V1.redact(b'if b"-----BEGIN PRIVATE KEY-----" in data:\n    pass\n')
    assert out == b'if b"[REDACTED:private_key]\n    pass\n'
    assert state == 0


def test_pem_unterminated_block_ends_after_cap() -> None:
    body = b"".join(b"line %d\n" % i for i in range(MAX_PEM_LINES + 5))
    out, state = V1.redact(b"-----BEGIN EC PRIVATE KEY-----\n" + body)
    assert out == b"[REDACTED:private_key]\n" + b"".join(
        b"line %d\n" % i for i in range(MAX_PEM_LINES, MAX_PEM_LINES + 5)
    )
    assert state == 0


def test_pem_open_block_reports_state() -> None:
    _, state = V1.redact(b"-----BEGIN PRIVATE KEY-----\nMIIE\n")
    assert state == 2
    out, state = V1.redact(b"MIIE\n-----END PRIVATE KEY----- tail\n", state)
    assert (out, state) == (b" tail\n", 0)


def test_invalid_utf8_becomes_replacement_character() -> None:
    out, _ = V1.redact(b"bad \xff\xfe bytes \xe2\x82\n")
    assert out.decode() == "bad \ufffd\ufffd bytes \ufffd\n"


def test_deterministic_and_registered() -> None:
    data = PEM + b"password=x sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123\n"
    assert V1.redact(data) == V1.redact(data)
    assert get_ruleset("v1") is V1
    # v2 has v1's rules and differs only in where long lines are cut (tests/unit/test_log_reader.py).
    assert get_ruleset("v2") is V2
    assert V2.rules == V1.rules and V2.redact(data) == V1.redact(data)
    assert V1.cut_guard is None and V2.cut_guard is not None and V2.fingerprint != V1.fingerprint


def test_spans_cover_whole_matches_and_private_keys() -> None:
    """What a v2 cut must not split: a rule's whole match (key and value) and a BEGIN..END key."""
    data = (
        b'x Authorization: Bearer abcdefghijklmnopqrstu y password = "a b" z -----BEGIN PRIVATE KEY-----\\nM'
    )
    spans = [data[start:end] for start, end in V2.spans(data)]
    assert spans == [
        b"Authorization: Bearer abcdefghijklmnopqrstu",
        b'password = "a b"',
        b"-----BEGIN PRIVATE KEY-----\\nM",
    ]
    assert V2.spans(b"nothing to see here, move along") == []
    with pytest.raises(InvalidRequest):
        get_ruleset("v0")


def test_v3_masks_url_credentials_with_an_empty_user_name() -> None:
    """`redis://:password@host` is how a Redis password is usually given: v2 showed it."""
    assert get_ruleset("v3") is V3
    line = b"connecting to REDIS_URL=redis://:S3cretRedisPassw0rd@cache:6379/0\n"
    assert b"S3cretRedisPassw0rd" in V2.redact(line)[0]  # v2 is published: never edited
    assert V3.redact(line)[0] == b"connecting to REDIS_URL=redis://[REDACTED:url_credentials]@cache:6379/0\n"
    for kept in (b"see http://host:8080/path@x\n", b"git@github.com:o/r.git\n", b"http://[::1]:80/\n"):
        assert V3.redact(kept)[0] == kept
    # Everything else as v2 (and v1).
    data = PEM + b"password=x https://u:pw@h/ sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123\n"
    assert V3.redact(data) == V2.redact(data)
    assert V3.cut_guard == V2.cut_guard and V3.fingerprint != V2.fingerprint


@pytest.mark.parametrize(
    "secret",
    [
        b"xapp-1-A0123456789-1234567890123-abcdefabcdefabcdefabcdef",
        b"xoxe-1-abcdefghijklmnopqrstuvwxyz0123456789",
        b"xoxe.xoxp-1-abcdefghijklmnopqrstuvwxyz",
        b"https://outlook.office.com/webhook/0f1e2d3c@4b5a6978/IncomingWebhook/abc123/def456",
        b"https://outlook.office365.com/webhook/0f1e2d3c@4b5a6978/IncomingWebhook/abc123/def456",
    ],
)
def test_v4_masks_slack_app_and_refresh_tokens_and_legacy_teams_webhooks(secret: bytes) -> None:
    """v3 showed Slack app-level (`xapp-`) and refresh (`xoxe-`) tokens and the webhooks of
    Teams' legacy host. v3 is published (never edited); v4 is the default."""
    assert RULESETS[REDACTION_VERSION] is V4 and get_ruleset("v4") is V4
    line = b"sending with " + secret + b" now\n"
    assert secret in V3.redact(line)[0] or b"xoxe." in V3.redact(line)[0]
    redacted = V4.redact(line)[0]
    assert (
        secret not in redacted
        and redacted.startswith(b"sending with [REDACTED:")
        and redacted.endswith(b" now\n")
    )
    for kept in (b"axapp-1234567890123\n", b"the xapp-id flag\n", b"see outlook.office.com/mail\n"):
        assert V4.redact(kept)[0] == kept
