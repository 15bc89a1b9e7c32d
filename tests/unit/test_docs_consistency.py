"""The docs an operator reads, held against the code they describe: a setting, a command, an
option, a metric or a service-log name added, renamed or re-ranged on one side and not the other
fails here instead of misleading whoever follows the docs."""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main

from codex_runner.cli import app
from codex_runner.config import Settings, load_settings
from codex_runner.errors import ConfigError
from codex_runner.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "codex_runner"
# The contract ships beside the repository (README.md), not inside it.
SPEC = ROOT.parent / "shared" / "SPEC.md"
# Read by the code from the environment only, never a `Settings` field (docs/configuration.md).
ENV_ONLY = {"RUNNER_NO_INIT"}


def _setting_rows(text: str) -> dict[str, tuple[str, str, int]]:
    """Rows of a `| variable | default | meaning |` table: name -> (default cell, meaning cell,
    how many names share the row)."""
    rows: dict[str, tuple[str, str, int]] = {}
    for line in text.splitlines():
        if not line.startswith("| `RUNNER_"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(RUNNER_[A-Z0-9_]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(", ")] if len(names) > 1 else [cells[1]]
        for i, name in enumerate(names):
            rows[name] = (defaults[i] if i < len(defaults) else cells[1], cells[2], len(names))
    return rows


CONFIG_ROWS = _setting_rows((DOCS / "configuration.md").read_text())
SETTINGS = {
    "RUNNER_" + f.name.upper(): f.name for f in fields(Settings) if f.name not in {"repos", "scripts"}
}
DEFAULTS = Settings()


def _environment_reads() -> set[str]:
    """`RUNNER_*` names the code reads from `os.environ` outside config.py."""
    found: set[str] = set()
    pattern = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["'](RUNNER_[A-Z0-9_]+)["']""")
    for path in SRC.rglob("*.py"):
        found.update(pattern.findall(path.read_text()))
    return found


def test_every_setting_is_documented_and_every_documented_one_exists() -> None:
    documented = set(CONFIG_ROWS)
    assert set(SETTINGS) - documented == set(), "settings missing from docs/configuration.md"
    assert documented - set(SETTINGS) - ENV_ONLY == set(), (
        "docs/configuration.md names settings the code lacks"
    )
    assert _environment_reads() - documented == set(), "environment variables read but not documented"


def test_every_spec_setting_is_documented() -> None:
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is not beside this checkout")
    section = SPEC.read_text().split("## 2. Configuration", 1)[1].split("\n## ", 1)[0]
    assert set(_setting_rows(section)) - set(CONFIG_ROWS) == set()


def _shown(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# Settings whose default is a value; the others are unset, a path under the data folder or made
# at start-up (the runner id, the database URL), which the docs say in words.
SCALAR_SETTINGS = sorted(
    name
    for name, attr in SETTINGS.items()
    if isinstance(getattr(DEFAULTS, attr), int | float | str) and getattr(DEFAULTS, attr) != ""
)


@pytest.mark.parametrize("env_name", SCALAR_SETTINGS)
def test_documented_default_is_the_code_default(env_name: str) -> None:
    default = getattr(DEFAULTS, SETTINGS[env_name])
    cell = CONFIG_ROWS[env_name][0]
    shown = re.match(r"`([^`]*)`", cell)
    assert shown is not None and shown.group(1) == _shown(default), f"{env_name}: docs say {cell}"


def _documented_range(meaning: str) -> tuple[int | None, int | None]:
    """The bounds a row states: `(≥ N)`, or `A–B` (an en dash) for both."""
    both = re.search(r"\((?:[a-z ]+)?(\d+)–(\d+)[;) ]", meaning)
    if both:
        return int(both.group(1)), int(both.group(2))
    low = re.search(r"\(≥ (\d+)[;)]", meaning)
    return (int(low.group(1)), None) if low else (None, None)


INT_SETTINGS = sorted(
    name
    for name, attr in SETTINGS.items()
    if type(getattr(DEFAULTS, attr)) is int and CONFIG_ROWS.get(name, ("", "", 0))[2] == 1
)


def _refused(tmp_path: Path, env_name: str, value: int) -> bool:
    env = {env_name: str(value)}
    if env_name == "RUNNER_HEARTBEAT_SECONDS":  # must stay under the stale threshold
        env["RUNNER_STALE_AFTER_SECONDS"] = str(value + 1)
    try:
        load_settings(env, cwd=tmp_path)
    except ConfigError as exc:
        assert env_name in exc.message  # the error names the setting
        return True
    return False


@pytest.mark.parametrize("env_name", INT_SETTINGS)
def test_documented_range_is_the_validated_range(tmp_path: Path, env_name: str) -> None:
    """docs/configuration.md: counts and limits have the minimum shown in the table or 0; a
    range `A–B` is what start-up accepts."""
    low, high = _documented_range(CONFIG_ROWS[env_name][1])
    if "must exceed" in CONFIG_ROWS[env_name][1]:
        pytest.skip("bounded by another setting, said in words")
    low = 0 if low is None else low
    assert not _refused(tmp_path, env_name, low), f"{env_name}: the documented minimum {low} is refused"
    assert _refused(tmp_path, env_name, low - 1), (
        f"{env_name}: {low - 1}, under the documented minimum, is taken"
    )
    if high is not None:
        assert not _refused(tmp_path, env_name, high)
        assert _refused(tmp_path, env_name, high + 1), (
            f"{env_name}: {high + 1}, over the documented maximum, is taken"
        )


def _commands() -> list[tuple[str, list[str]]]:
    """(`codex-runner jobs list`, its option spellings) for every command of the CLI."""
    found: list[tuple[str, list[str]]] = []

    def walk(command: object, path: str) -> None:
        sub = getattr(command, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(child, f"{path} {name}")
            return
        spellings = [
            opt
            for param in getattr(command, "params", [])
            for opt in getattr(param, "opts", [])
            if opt.startswith("-") and opt != "--help"
        ]
        found.append((path, spellings))

    walk(typer.main.get_command(app), "codex-runner")
    return found


def _section(text: str, heading_with: str) -> str | None:
    """The text under the heading that names `heading_with`, down to the next heading of its
    level or above."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        heading = re.match(r"(#+) ", line)
        if heading and re.search(rf"`{re.escape(heading_with)}[ `]", line):
            level = len(heading.group(1))
            end = next(
                (j for j in range(i + 1, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[j])),
                len(lines),
            )
            return "\n".join(lines[i:end])
    return None


@pytest.mark.parametrize(("command", "spellings"), _commands(), ids=[c for c, _ in _commands()])
def test_every_command_and_option_is_documented(command: str, spellings: list[str]) -> None:
    docs = (DOCS / "cli.md").read_text() + "\n" + (DOCS / "operations.md").read_text()
    section = _section(docs, command)
    assert section is not None, f"no heading for `{command}` in docs/cli.md or docs/operations.md"
    missing = [s for s in spellings if not re.search(rf"`[^`]*(?<![\w-]){re.escape(s)}(?![\w-])", section)]
    assert missing == [], f"`{command}`: options its section does not name"


def _metric_families() -> dict[str, set[str]]:
    """Every family `/metrics` exposes, with its labels (`le` aside), each labelled child made."""
    metrics = Metrics()
    metrics.observe_http("GET", "/healthz", 200, 0.01)
    metrics.observe_finished("demo", "success", 1.0)
    from prometheus_client import generate_latest

    families: dict[str, set[str]] = {}
    text = generate_latest(metrics.registry).decode()
    for line in text.splitlines():
        typed = re.match(r"# TYPE (\S+) ", line)
        # prometheus_client adds a `<name>_created` gauge beside counters and histograms.
        if typed and not typed.group(1).endswith("_created"):
            families[typed.group(1)] = set()
    for family, labels in families.items():
        for sample in re.findall(rf"^{family}(?:_bucket|_sum|_count)?\{{([^}}]*)\}}", text, re.M):
            labels.update(name for name in re.findall(r'(\w+)="', sample) if name != "le")
    return families


def test_every_metric_is_documented_with_its_labels() -> None:
    section = (DOCS / "operations.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    for family, labels in _metric_families().items():
        row = re.search(rf"^\| `{family}` \|[^|]*\|([^|]*)\|", section, re.M)
        assert row is not None, f"{family}: no row in docs/operations.md, Metrics"
        named = re.sub(r"\([^)]*\)", "", row.group(1))  # what a label holds is said in brackets
        assert set(re.findall(r"`(\w+)`", named)) == labels, f"{family}: labels differ"


def _code_names() -> set[str]:
    """Identifiers and the words of string literals of the package and its tests."""
    names: set[str] = set()
    for path in [*SRC.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.NAME:
                names.add(tok.string)
            elif tok.type == tokenize.STRING:
                names.update(re.findall(r"[a-z][a-z0-9_]*", tok.string))
    return names


# docs/codex.md and docs/performance.md name codex's, the kernel's and the benches' own things.
NAMED_ELSEWHERE = {"pg_stat_database", "secret_key", "api_key"}


def test_names_cited_in_the_docs_exist_in_the_code() -> None:
    """Service-log events, event types, error codes, check names: a `snake_case` name the docs
    cite, that the code no longer has, sends an operator looking for a line that never comes."""
    code = _code_names()
    cited: dict[str, str] = {}
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        if path.name in {"codex.md", "performance.md"}:
            continue
        for name in re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", path.read_text()):
            cited.setdefault(name, path.name)
    unknown = {name: doc for name, doc in cited.items() if name not in code and name not in NAMED_ELSEWHERE}
    assert unknown == {}


_CITED_FILE = re.compile(
    r"(?<![\w/.])((?:src|tests|bench|scripts|demo|docs|api|execution|ops|logs|store|catalog|cli|codex_runner)"
    r"/[\w/.-]+\.(?:py|md|sh|jsonl|toml))"
)


def test_files_the_docs_cite_exist() -> None:
    """A module path (`api/connection.py`, `bench/dispatch.py`) or a relative link that names
    nothing sends a reader to a file that was renamed or never was."""
    missing: list[str] = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text()
        for cited in set(_CITED_FILE.findall(text)):
            if not any((base / cited).exists() for base in (ROOT, ROOT / "src", SRC)):
                missing.append(f"{path.name}: {cited}")
        for link in set(re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)):
            if not (path.parent / link).exists():
                missing.append(f"{path.name}: link {link}")
    assert missing == []


def _route_rows(text: str) -> dict[tuple[str, str], str]:
    """`| `METHOD /path` | answer |` rows, path parameters written `{}`."""
    rows = re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/[^`]*)` \|(.*)$", text, re.M)
    return {(method, re.sub(r"\{\w+\}", "{}", path)): answer for method, path, answer in rows}


def test_every_route_is_in_the_api_docs_and_every_documented_one_is_served() -> None:
    from codex_runner.api import logs, routes

    served: set[tuple[str, str]] = set()
    for route in [*routes.router.routes, *routes.probe_router.routes, *logs.router.routes]:
        path = re.sub(r"\{\w+\}", "{}", getattr(route, "path", ""))
        if path == "/openapi.json":  # said in prose: served to any authenticated caller
            continue
        served.update((method, path) for method in getattr(route, "methods", ()))
    documented = _route_rows((DOCS / "api.md").read_text())
    assert {r for r in served if r[0] != "HEAD"} == set(documented)
    for _, path in sorted(r for r in served if r[0] == "HEAD"):
        assert "`HEAD`" in documented[("GET", path)], f"HEAD {path} is served; docs/api.md does not say so"
    if SPEC.is_file():
        assert set(_route_rows(SPEC.read_text())) <= set(documented)
