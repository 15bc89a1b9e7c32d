"""Start-up checks: each one shown failing by a test that really breaks it, with a readable
message, `codex-runner doctor` exiting non-zero, and production mode turning warnings into
failures. Also `startup()` and what `/readyz` and the diagnostics route make of the results."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from codex_runner.api import create_app
from codex_runner.catalog import Catalog
from codex_runner.config import Settings, load_settings
from codex_runner.errors import ConfigError
from codex_runner.execution.codex_version import CODEX_VERSION
from codex_runner.ops import doctor
from codex_runner.ops.doctor import Check, blocking_failures, run_checks, startup
from codex_runner.runtime import Runtime
from codex_runner.secrets import generate_key
from codex_runner.store import create_store_engine
from codex_runner.store.migrate import upgrade

from tests.helpers import free_port, make_git_repo, serve_app
from tests.integration.ops_cli import run_cli

BASE_TOML = """
[repos.demo]
source = "{repo}"

[scripts.echo]
command = ["/bin/echo", "hello"]
"""

Make = Callable[..., tuple[Settings, dict[str, str]]]


@pytest.fixture
def make(tmp_path: Path) -> Make:
    """Settings for a healthy dev install (migrated SQLite unless a URL is given), plus `extra_toml`."""
    repo = make_git_repo(tmp_path / "repos" / "demo")

    def build(
        extra_toml: str = "", database_url: str | None = None, **env: str
    ) -> tuple[Settings, dict[str, str]]:
        (tmp_path / "runner.toml").write_text(
            textwrap.dedent(BASE_TOML.format(repo=repo)) + textwrap.dedent(extra_toml)
        )
        full = {
            "RUNNER_DATA_DIR": str(tmp_path / "data"),
            "RUNNER_DATABASE_URL": database_url or f"sqlite:///{tmp_path / 'data' / 'runner.db'}",
            "RUNNER_ALLOWED_REPO_PATHS": str(tmp_path / "repos"),
            "RUNNER_ID": "test-doctor",
            **env,
        }
        settings = load_settings(full, cwd=tmp_path)
        engine = create_store_engine(settings.database_url)
        upgrade(engine)
        engine.dispose()
        return settings, full

    return build


def checks_of(settings: Settings) -> dict[str, Check]:
    return {c.name: c for c in run_checks(settings, Catalog.from_settings(settings))}


def assert_fails(check: Check, *words: str) -> None:
    assert not check.ok and check.blocking, check
    assert "\n" not in check.message and len(check.message) < 300
    for word in words:
        assert word in check.message, check.message


def make_healthy_production(settings: Settings) -> Settings:
    """What production mode asks for: a private data folder, a fresh backup, a key."""
    settings.data_dir.chmod(0o700)
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    from codex_runner.ops.backup import backup

    backup(settings)
    return dataclasses.replace(settings, production=True, encryption_key=generate_key())


def test_healthy_install_has_no_blocking_problem(make: Make, database_url: str) -> None:
    settings, _ = make(database_url=database_url)
    checks = checks_of(settings)
    assert blocking_failures(checks.values()) == []
    for name in (
        "database",
        "migrations",
        "folder:data",
        "folder:log",
        "folder:workspace",
        "git",
        "repo:demo",
    ):
        assert checks[name].ok, checks[name]
    assert checks["script:echo"].ok
    # Built-in codex.exec: a missing `codex` is a warning, never a failure.
    codex = checks["script:codex.exec"]
    assert codex.ok if shutil.which("codex") else (codex.level == "warn" and "codex" in codex.message)
    assert checks["backup"].level == "warn"  # none yet; fine outside production
    assert all(
        set(c.to_dict()) == {"name", "ok", "blocking", "level", "message", "detail"} for c in checks.values()
    )


def test_database_unreachable_and_not_migrated(make: Make, tmp_path: Path, database_url: str) -> None:
    settings, _ = make()
    down = dataclasses.replace(settings, database_url="postgresql://runner:Pw-0123456789@127.0.0.1:1/runner")
    check = checks_of(down)["database"]
    assert_fails(check, "database not reachable")
    assert "Pw-0123456789" not in check.message
    fresh = dataclasses.replace(settings, database_url=database_url)
    if database_url.startswith("sqlite"):
        fresh = dataclasses.replace(settings, database_url=f"sqlite:///{tmp_path / 'fresh.db'}")
    else:
        from codex_runner.store.schema import metadata

        engine = create_store_engine(database_url)
        metadata.create_all(engine)  # tables but no alembic revision: an unmigrated database
        engine.dispose()
    assert_fails(checks_of(fresh)["migrations"], "codex-runner migrate")


def test_a_schema_migrated_by_a_newer_version(make: Make, tmp_path: Path, database_url: str) -> None:
    """A database migrated by a newer codex-runner (a revision this build does not have): doctor
    said "run `codex-runner migrate`", and `migrate` and `serve` then failed with `unexpected
    CommandError: Can't locate revision ...`. Each now says the schema is newer than this version,
    naming both revisions, and changes nothing."""
    import sqlalchemy as sa

    from codex_runner.store.migrate import current_revision, head_revision

    settings, env = make(database_url=database_url)
    engine = create_store_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    head = head_revision()
    assert head is not None
    check = checks_of(settings)["migrations"]
    assert_fails(check, "9999_from_the_future", head, "newer than this version of codex-runner")
    assert "codex-runner migrate" not in check.message
    with pytest.raises(ConfigError, match="newer than this version of codex-runner"):
        Runtime.open(settings)
    for command in (["migrate"], ["cleanup", "--dry-run"]):
        done = run_cli(command, env, tmp_path)
        assert done.returncode == 2, done
        assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
        assert done.stderr.startswith("error: database schema is at revision 9999_from_the_future")
        assert head in done.stderr and "unexpected" not in done.stderr
    assert current_revision(engine) == "9999_from_the_future"
    engine.dispose()


def test_script_not_executable_or_missing(make: Make, tmp_path: Path) -> None:
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o644)  # root may write anything, but exec needs an x bit even for root
    settings, _ = make(
        f"""
        [scripts.noexec]
        command = ["{tool}"]

        [scripts.gone]
        command = ["/nonexistent/program-xyz", "--flag"]

        [scripts.notonpath]
        command = ["no-such-program-xyz"]
        """
    )
    checks = checks_of(settings)
    assert_fails(checks["script:noexec"], str(tool), "not executable")
    assert_fails(checks["script:gone"], "/nonexistent/program-xyz", "does not exist")
    assert_fails(checks["script:notonpath"], "no-such-program-xyz", "not on PATH")
    tool.chmod(0o755)
    assert checks_of(settings)["script:noexec"].ok


def test_a_relative_program_is_not_checked_where_doctor_runs(make: Make, tmp_path: Path) -> None:
    """`./tool.sh` is found in each job's workspace (its working directory), not beside
    runner.toml: present here or not, doctor cannot tell, so it warns and never fails on it."""
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    settings, _ = make(
        """
        [scripts.here]
        command = ["./tool.sh"]

        [scripts.in_repo]
        command = ["bin/only-in-the-repo.sh"]
        """
    )
    checks = checks_of(settings)
    for key in ("here", "in_repo"):
        check = checks[f"script:{key}"]
        assert not check.blocking and "workspace" in check.message, check
        assert check.level == "warn", check


def test_repo_missing_not_git_or_outside_allowlist(make: Make, tmp_path: Path) -> None:
    plain = tmp_path / "repos" / "plain"
    plain.mkdir(parents=True)
    outside = make_git_repo(tmp_path / "elsewhere" / "repo")
    settings, _ = make(
        f"""
        [repos.gone]
        source = "{tmp_path / "repos" / "gone"}"

        [repos.plain]
        source = "{plain}"

        [repos.outside]
        source = "{outside}"

        [repos.off]
        source = "{tmp_path / "repos" / "also-gone"}"
        enabled = false
        """
    )
    checks = checks_of(settings)
    assert_fails(checks["repo:gone"], "gone", "does not exist")
    assert_fails(checks["repo:plain"], "not a git repository")
    assert_fails(checks["repo:outside"], "RUNNER_ALLOWED_REPO_PATHS")
    assert "repo:off" not in checks  # disabled repos are not checked


def test_log_folder_that_is_a_file(make: Make, tmp_path: Path) -> None:
    # chmod 000 does not stop root; a regular file where the folder should be stops everyone.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    settings, _ = make(RUNNER_LOG_DIR=str(blocker))
    assert_fails(checks_of(settings)["folder:log"], str(blocker), "not a folder")
    nested = dataclasses.replace(settings, workspace_dir=blocker / "ws")
    assert_fails(checks_of(nested)["folder:workspace"], "not usable")


def test_a_data_folder_under_a_file_is_a_failed_check(make: Make, tmp_path: Path) -> None:
    """With RUNNER_DATA_DIR under a regular file, the SQLite database's folder could not be made:
    `doctor` stopped before any check (exit 2, nothing on stdout, `--json` not JSON). It is now a
    failed `database` check, beside the failed data folder, and doctor exits 1."""
    _, env = make()
    (tmp_path / "notadir").write_text("a file\n")
    data = tmp_path / "notadir" / "data"
    env = {**env, "RUNNER_DATA_DIR": str(data)}
    del env["RUNNER_DATABASE_URL"]  # the default, under the data folder
    code, out, err = _doctor(env, tmp_path, "--json")
    assert code == 1, out + err
    doc: dict[str, Any] = json.loads(out)
    assert doc["ok"] is False
    failed = {c["name"]: c["message"] for c in doc["checks"] if c["level"] == "fail"}
    assert {"database", "folder:data"} <= set(failed), failed
    assert failed["database"].startswith(f"database folder {data} is not usable")
    assert "not a folder" in failed["database"]
    assert "migrations" not in {c["name"] for c in doc["checks"]}
    code, out, _ = _doctor(env, tmp_path)
    assert code == 1
    assert any(line.split()[:2] == ["FAIL", "database"] for line in out.splitlines()), out


def test_an_audit_log_that_cannot_be_written(make: Make, tmp_path: Path) -> None:
    """RUNNER_AUDIT_LOG under a regular file passed `doctor`, then stopped `serve` with `error:
    unexpected FileExistsError`, naming no setting. doctor now fails its `audit_log` check (also
    for a folder where the file should be), and `serve` stops with one line naming the setting."""
    (tmp_path / "afile").write_text("a file\n")
    blocked = tmp_path / "afile" / "audit.jsonl"
    settings, env = make(RUNNER_AUDIT_LOG=str(blocked))
    assert_fails(checks_of(settings)["audit_log"], "RUNNER_AUDIT_LOG", str(blocked))
    folder = tmp_path / "a-folder.jsonl"
    folder.mkdir()
    assert_fails(
        checks_of(dataclasses.replace(settings, audit_log=folder))["audit_log"], "RUNNER_AUDIT_LOG", "folder"
    )
    fine = tmp_path / "logs" / "audit.jsonl"
    assert checks_of(dataclasses.replace(settings, audit_log=fine))["audit_log"].ok
    assert not fine.exists()  # doctor tried its folder, it wrote no audit log
    assert checks_of(dataclasses.replace(settings, audit_log=None))["audit_log"].ok

    code, out, _ = _doctor(env, tmp_path)
    assert code == 1
    assert [line.split()[1] for line in out.splitlines() if line.startswith("FAIL")] == ["audit_log"]
    served = run_cli(["serve"], {**env, "RUNNER_PORT": str(free_port())}, tmp_path, timeout=60)
    assert served.returncode == 2, served
    errors = [line for line in served.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: RUNNER_AUDIT_LOG: cannot write the audit log {blocked}: a file is in the way of its folder"
    ]


def test_an_empty_or_future_dated_backup_is_no_backup(make: Make) -> None:
    """The backup check reads the age from the archive's name: an empty file, or one named for a
    later time, must not count as a fresh backup (a production start would trust it)."""
    settings, _ = make()
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    future = settings.backup_dir / "runner-29990101T000000Z.tar.gz"
    future.write_bytes(b"x")
    prod = dataclasses.replace(settings, production=True)
    assert_fails(checks_of(prod)["backup"], future.name, "dated in the future")
    future.unlink()
    from codex_runner.ops.backup import backup

    made = backup(settings).path
    assert checks_of(prod)["backup"].ok
    made.write_bytes(b"")
    assert_fails(checks_of(prod)["backup"], made.name, "is empty")


def test_encryption_key_checks(make: Make, database_url: str) -> None:
    key = generate_key()
    settings, _ = make(database_url=database_url, RUNNER_ENCRYPTION_KEY=key)
    rt = Runtime.open(settings)
    rt.credentials.set("github", "github.com", "oauth2", "ghp_0123456789abcdef")
    rt.close()
    assert checks_of(settings)["encryption_key"].ok

    wrong = dataclasses.replace(settings, encryption_key=generate_key())
    assert_fails(checks_of(wrong)["encryption_key"], "does not decrypt", "github")
    garbage = dataclasses.replace(settings, encryption_key="not-a-key")
    assert_fails(checks_of(garbage)["encryption_key"], "does not parse")
    # The old key as _PREVIOUS still decrypts: a rotation in progress is fine.
    rotating = dataclasses.replace(settings, encryption_key=generate_key(), encryption_key_previous=key)
    assert checks_of(rotating)["encryption_key"].ok
    # Every credential is tried, not the first by name alone: after a key change without
    # `credentials rotate`, one stored under the new key decrypts and the older ones do not.
    newer = generate_key()
    rt = Runtime.open(dataclasses.replace(settings, encryption_key=newer))
    rt.credentials.set("aaa", "example.com", "oauth2", "0123456789abcdef")
    rt.close()
    mixed = checks_of(dataclasses.replace(settings, encryption_key=newer))["encryption_key"]
    assert_fails(mixed, "does not decrypt", "'github'", "credentials rotate")
    assert "'aaa'" not in mixed.message

    keyless = dataclasses.replace(settings, encryption_key=None)
    check = checks_of(keyless)["encryption_key"]
    assert check.level == "warn" and "2 stored credential" in check.message
    assert_fails(
        checks_of(dataclasses.replace(keyless, production=True))["encryption_key"], "RUNNER_ENCRYPTION_KEY"
    )


def test_a_repo_naming_a_credential_not_stored_warns(make: Make, database_url: str, tmp_path: Path) -> None:
    """Every job of such a repo fails its prepare: said before the first one, naming the repo."""
    settings, _ = make(
        f"""
        [repos.withcred]
        source = "{tmp_path / "repos" / "demo"}"
        credential = "github"

        [repos.stored]
        source = "{tmp_path / "repos" / "demo"}"
        credential = "gitlab"

        [repos.offcred]
        source = "{tmp_path / "repos" / "demo"}"
        credential = "nowhere"
        enabled = false
        """,
        database_url=database_url,
        RUNNER_ENCRYPTION_KEY=generate_key(),
    )
    rt = Runtime.open(settings)
    rt.credentials.set("gitlab", "gitlab.com", "oauth2", "glpat-0123456789abcdef")
    rt.close()
    checks = checks_of(settings)
    missing = checks["credential:withcred"]
    assert missing.level == "warn" and not missing.blocking, missing
    assert "'github'" in missing.message and "credentials set github" in missing.message
    assert "credential:stored" not in checks and "credential:offcred" not in checks
    assert blocking_failures(checks.values()) == []


def test_short_secrets_warn(make: Make) -> None:
    settings, _ = make(RUNNER_JWT_SECRET="short")
    check = checks_of(settings)["short_secrets"]
    assert (
        check.level == "warn"
        and "RUNNER_JWT_SECRET" in check.message
        and "short" not in check.message.split()
    )


def test_disk_thresholds(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = make()
    real = shutil.disk_usage
    # A nearly full disk cannot be made here safely; only the free-space figure is replaced.
    for free, level in ((50 * doctor.MIB, "fail"), (500 * doctor.MIB, "warn"), (5000 * doctor.MIB, "ok")):
        monkeypatch.setattr(shutil, "disk_usage", lambda p, free=free: real(p)._replace(free=free))
        check = next(
            c for c in run_checks(settings, Catalog.from_settings(settings)) if c.name.startswith("disk:")
        )
        assert check.level == level, check


def test_production_turns_unsafe_settings_into_failures(make: Make, tmp_path: Path) -> None:
    settings, _ = make(
        f"""
        [repos.wild]
        source = "{tmp_path / "repos" / "demo"}"
        risk_policy = "permissive"

        [scripts.yolo]
        command = ["/bin/echo", "--dangerously-bypass-approvals-and-sandbox"]
        """,
        RUNNER_HOST="0.0.0.0",
    )
    settings.data_dir.chmod(0o755)
    old = settings.backup_dir / "runner-20200101T000000Z.tar.gz"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(b"x")
    dev = checks_of(settings)
    names = ("data_dir_permissions", "bind_address", "backup", "script_policy:yolo", "repo_policy:wild")
    for name in names:
        assert dev[name].level == "warn", dev[name]
    prod = checks_of(dataclasses.replace(settings, production=True))
    assert_fails(prod["data_dir_permissions"], "chmod 700")
    assert_fails(prod["bind_address"], "RUNNER_ALLOW_REMOTE")
    assert_fails(prod["backup"], "runner-20200101T000000Z.tar.gz", "RUNNER_BACKUP_MAX_AGE_DAYS=7")
    assert_fails(prod["script_policy:yolo"], "--dangerously-bypass-approvals-and-sandbox")
    assert_fails(prod["repo_policy:wild"], "permissive")
    allowed = checks_of(dataclasses.replace(settings, production=True, allow_remote=True))
    assert "bind_address" not in allowed


def test_a_weak_jwt_secret_and_the_missing_redis_ingress_are_unsafe(make: Make) -> None:
    """A JWT secret under 32 bytes (an HS256 key that can be guessed offline from one token, which
    then signs `role: admin` for anyone) passed even in production, as did RUNNER_REDIS_URL, which
    nothing reads: jobs put on the stream would never run."""
    settings, _ = make(RUNNER_JWT_SECRET="password1234", RUNNER_REDIS_URL="redis://127.0.0.1:6379/0")
    dev = checks_of(settings)
    assert dev["jwt_secret"].level == "warn" and not dev["jwt_secret"].blocking
    assert dev["redis_ingress"].level == "warn" and not dev["redis_ingress"].blocking
    prod = checks_of(dataclasses.replace(settings, production=True))
    assert_fails(prod["jwt_secret"], "12 bytes", "32", "openssl rand")
    assert "password1234" not in prod["jwt_secret"].message
    assert_fails(prod["redis_ingress"], "RUNNER_REDIS_URL", "never run")
    strong = dataclasses.replace(settings, production=True, jwt_secret="k" * 32, redis_url=None)
    checks = checks_of(strong)
    assert "jwt_secret" not in checks and "redis_ingress" not in checks


def test_the_short_bypass_flag_is_flagged_too(make: Make) -> None:
    """`--yolo` is codex's short name for --dangerously-bypass-approvals-and-sandbox: the check
    looked for the long name only."""
    settings, _ = make(
        """
        [scripts.short]
        command = ["codex", "exec", "--yolo", "-"]
        """
    )
    check = checks_of(settings)["script_policy:short"]
    assert check.level == "warn" and "--yolo" in check.message


def test_codex_home_open_to_others(make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's CODEX_HOME holds codex's login and every conversation: private like the data dir."""
    monkeypatch.delenv("CODEX_HOME", raising=False)
    settings, _ = make()
    assert "codex_home_permissions" not in checks_of(settings)  # not created yet: nothing to say
    default_home = settings.data_dir / "codex-home"
    default_home.mkdir(mode=0o700)
    assert "codex_home_permissions" not in checks_of(settings)
    default_home.chmod(0o750)
    assert checks_of(settings)["codex_home_permissions"].level == "warn"
    assert_fails(
        checks_of(dataclasses.replace(settings, production=True))["codex_home_permissions"], "chmod 700"
    )
    own = tmp_path / "operator-codex-home"
    own.mkdir(mode=0o755)
    own.chmod(0o755)
    check = checks_of(dataclasses.replace(settings, codex_home=own, production=True))[
        "codex_home_permissions"
    ]
    assert_fails(check, str(own), "755")
    # A CODEX_HOME passed through from the runner's environment belongs to its owner.
    monkeypatch.setenv("CODEX_HOME", str(own))
    assert "codex_home_permissions" not in checks_of(settings)


def test_startup_readyz_and_diagnostics(make: Make, tmp_path: Path) -> None:
    settings, _ = make('\n[scripts.gone]\ncommand = ["/nonexistent/program-xyz"]\n')
    rt = Runtime.open(settings)
    try:
        checks = startup(rt)  # dev mode: starts anyway
        assert rt.startup_checks == [c.to_dict() for c in checks]
        admin, _ = rt.tokens.create("root", "admin")
        with serve_app(create_app(rt)) as url:
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
            diag = httpx.get(
                f"{url}/api/runner/diagnostics", headers={"Authorization": f"Bearer {admin}"}, timeout=10
            ).json()
            failing = [c for c in diag["startup_checks"] if c["level"] == "fail"]
            assert [c["name"] for c in failing] == ["script:gone"]
        with pytest.raises(ConfigError, match="program-xyz"):
            rt.settings = make_healthy_production(rt.settings)
            startup(rt)
    finally:
        rt.close()

    healthy, _ = make()
    rt = Runtime.open(make_healthy_production(healthy))
    try:
        startup(rt)  # production, nothing blocking: no exception
        with serve_app(create_app(rt)) as url:
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        rt.close()


def _doctor(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str, str]:
    done = run_cli(["doctor", *args], env, cwd)
    assert "Traceback" not in done.stderr
    return done.returncode, done.stdout, done.stderr


def test_cli_doctor_exit_codes(make: Make, tmp_path: Path) -> None:
    _, env = make()
    code, out, err = _doctor(env, tmp_path)
    assert code == 0, out + err
    assert "no blocking problem" in err

    _, env = make('\n[scripts.gone]\ncommand = ["/nonexistent/program-xyz"]\n')
    code, out, err = _doctor(env, tmp_path)
    assert code == 1
    assert any(line.startswith("FAIL") and "program-xyz" in line for line in out.splitlines())
    code, out, _ = _doctor(env, tmp_path, "--json")
    doc: dict[str, Any] = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert {c["name"] for c in doc["checks"] if c["level"] == "fail"} == {"script:gone"}

    settings, env = make()
    settings.data_dir.chmod(0o700)
    old = settings.backup_dir / "runner-20200101T000000Z.tar.gz"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(b"x")
    env = {**env, "RUNNER_PRODUCTION": "true", "RUNNER_ENCRYPTION_KEY": generate_key()}
    code, out, _ = _doctor(env, tmp_path)
    assert code == 1
    assert [line.split()[1] for line in out.splitlines() if line.startswith("FAIL")] == ["backup"]

    code, out, err = _doctor({**env, "RUNNER_ENCRYPTION_KEY": "not-a-key"}, tmp_path)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "RUNNER_ENCRYPTION_KEY" in err
    assert os.environ.get("RUNNER_PRODUCTION") is None  # the test process itself was not changed


def test_running_as_pid_1_is_a_warning(
    make: Make, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = make(database_url=database_url)
    assert checks_of(settings)["init"].ok
    monkeypatch.setattr(doctor.os, "getpid", lambda: 1)
    monkeypatch.setenv("RUNNER_NO_INIT", "1")
    check = checks_of(settings)["init"]
    assert not check.ok and not check.blocking and check.level == "warn"
    assert "zombies" in check.message and "tini" in check.message
    # Without RUNNER_NO_INIT, `serve` and `worker` fork their own init: doctor (itself PID 1 here)
    # warned "(RUNNER_NO_INIT=1)" all the same.
    monkeypatch.delenv("RUNNER_NO_INIT")
    assert checks_of(settings)["init"].ok


def test_running_as_root_is_a_warning(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner run as root starts its jobs as root, which defeats its process sealing: a warning
    that says why and what to do, in production too (containers commonly run as root)."""
    settings, _ = make()
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 1000)
    check = checks_of(settings)["runs_as_root"]
    assert check.ok and "1000" in check.message
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 0)
    for s in (settings, dataclasses.replace(settings, production=True)):
        check = checks_of(s)["runs_as_root"]
        assert not check.ok and not check.blocking and check.level == "warn"
        assert "\n" not in check.message and len(check.message) < 300
        assert "every job runs as root" in check.message and "user of its own" in check.message


def fake_codex(folder: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An executable `codex` in `folder`, first on PATH: a shell script with `body`."""
    folder.mkdir(parents=True)
    codex = folder / "codex"
    codex.write_text("#!/bin/sh\n" + body + "\n")
    codex.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', os.defpath)}")
    return codex


def test_the_installed_codex_version_is_checked(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner is built and tested for one codex version (its flags, events, config keys):
    another one on PATH, or one that does not run, is a warning naming both versions."""
    settings, _ = make()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-a-version-probe")
    seen = tmp_path / "seen-env"
    codex = fake_codex(tmp_path / "good", f'env > {seen}; echo "codex-cli {CODEX_VERSION}"', monkeypatch)
    check = checks_of(settings)["codex_version"]
    assert check.ok and str(codex) in check.message and CODEX_VERSION in check.message, check
    # Run with the minimal environment, in a CODEX_HOME of its own that is gone afterwards.
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert "OPENAI_API_KEY" not in env and not any(n.startswith("RUNNER_") for n in env)
    assert env["CODEX_HOME"] and not Path(env["CODEX_HOME"]).exists()

    fake_codex(tmp_path / "old", 'echo "codex-cli 0.150.2"', monkeypatch)
    for s in (settings, dataclasses.replace(settings, production=True)):
        check = checks_of(s)["codex_version"]
        assert check.level == "warn" and not check.blocking, check
        assert "0.150.2" in check.message and CODEX_VERSION in check.message and "make codex" in check.message
        assert check.detail["found"] == "0.150.2" and check.detail["expected"] == CODEX_VERSION

    fake_codex(
        tmp_path / "broken",
        'echo "Missing optional dependency @openai/codex-linux-x64" >&2; exit 1',
        monkeypatch,
    )
    check = checks_of(settings)["codex_version"]
    assert check.level == "warn" and "does not run" in check.message and "Missing optional" in check.message

    fake_codex(tmp_path / "silent", "exit 0", monkeypatch)
    assert "printed no version" in checks_of(settings)["codex_version"].message

    fake_codex(tmp_path / "hangs", "sleep 30 & sleep 30", monkeypatch)
    monkeypatch.setattr(doctor.codex_version, "VERSION_TIMEOUT_SECONDS", 0.5)
    started = time.monotonic()
    check = checks_of(settings)["codex_version"]
    assert check.level == "warn" and "did not answer within 0.5 s" in check.message, check
    assert time.monotonic() - started < 5


def test_no_codex_version_check_without_a_codex_to_run(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = make()
    fake_codex(tmp_path / "old", 'echo "codex-cli 0.150.2"', monkeypatch)
    assert checks_of(settings)["codex_version"].level == "warn"
    # No codex script in the catalog: nothing runs codex, nothing to check.
    bare = {c.name for c in run_checks(settings, Catalog.from_settings(settings, builtins=False))}
    assert "codex_version" not in bare
    # codex.exec replaced by a script that is not codex.
    other, _ = make('\n[scripts."codex.exec"]\ncommand = ["/bin/echo", "hello"]\n')
    assert "codex_version" not in checks_of(other)
    # codex not found: `script:codex.exec` says so, once.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    checks = checks_of(settings)
    assert "codex_version" not in checks and checks["script:codex.exec"].level == "warn"


def test_the_real_codex_is_the_pinned_version(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.home() / ".cache" / "codex-runner" / f"codex-{CODEX_VERSION}" / "bin" / "codex"
    if not real.exists() or not shutil.which("node"):
        pytest.skip(f"no codex {CODEX_VERSION} at {real} (run `make codex`)")
    settings, _ = make()
    monkeypatch.setenv("PATH", f"{real.parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}")
    check = checks_of(settings)["codex_version"]
    assert check.ok and check.detail["found"] == CODEX_VERSION, check


def _without_user_namespaces() -> list[str]:
    """A command prefix under which no user namespace can be made, as on a host where unprivileged
    ones are off (kernel.unprivileged_userns_clone=0, Ubuntu's AppArmor restriction): a user
    namespace of the test's own whose limit of user namespaces is 0. Skips where even that is
    refused."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux's unshare is missing")
    prefix = [
        unshare,
        "--user",
        "--map-root-user",
        "sh",
        "-c",
        'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"',
        "sh",
    ]
    probe = subprocess.run([*prefix, unshare, "--user", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode == 0 or "No space left" not in probe.stderr:
        pytest.skip(f"cannot make a user namespace without user namespaces here: {probe.stderr[:200]}")
    return prefix


def test_codex_sandbox_needs_user_namespaces(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """codex runs the model's commands in bubblewrap, which makes a user namespace whoever runs it:
    root can wherever the kernel has them, a runner of its own user (what `runs_as_root` asks for)
    only where the kernel lets unprivileged users make them. Elsewhere every command the model runs
    fails: a warning that names the cause, tried for real (as `job_isolation` is)."""
    prefix = _without_user_namespaces()
    settings, env = make()
    fake_codex(tmp_path / "bin", f'echo "codex-cli {CODEX_VERSION}"', monkeypatch)
    assert checks_of(settings)["codex_sandbox"].ok

    done = run_cli(["doctor", "--json"], env, tmp_path, wrapper=prefix)
    assert "Traceback" not in done.stderr, done.stderr
    [check] = [c for c in json.loads(done.stdout)["checks"] if c["name"] == "codex_sandbox"]
    assert check["level"] == "warn" and not check["blocking"], check
    assert "user namespace" in check["message"] and "max_user_namespaces" in check["message"], check
    assert "\n" not in check["message"] and len(check["message"]) < 400

    # Nothing to check when no job would run codex in its sandbox.
    bare = {c.name for c in run_checks(settings, Catalog.from_settings(settings, builtins=False))}
    assert "codex_sandbox" not in bare
    catalog = Catalog.from_settings(settings)
    catalog.repos = {n: dataclasses.replace(r, risk_policy="permissive") for n, r in catalog.repos.items()}
    assert "codex_sandbox" not in {c.name for c in run_checks(settings, catalog)}


def test_the_runner_makes_its_data_folder_private(make: Make, tmp_path: Path) -> None:
    """The data folder holds the SQLite database (every job's arguments and prompts, token hashes,
    credentials), the logs and the workspaces. One the runner made itself was 0755, with a
    runner.db every local user could read, and its own `data_dir_permissions` then warned about
    it. Made 0700 by whichever makes it first: the SQLite engine, or the start-up checks (a
    database elsewhere, PostgreSQL)."""
    old = os.umask(0o022)  # the usual one: a folder made without a mode of its own is 0755
    try:
        settings, _ = make()  # migrates data/runner.db
        assert settings.data_dir.stat().st_mode & 0o777 == 0o700
        assert "data_dir_permissions" not in checks_of(settings)

        db = f"sqlite:///{tmp_path / 'db' / 'runner.db'}"
        elsewhere, _ = make(database_url=db, RUNNER_DATA_DIR=str(tmp_path / "d2"))
        assert not elsewhere.data_dir.exists()
        checks = checks_of(elsewhere)
        assert elsewhere.data_dir.stat().st_mode & 0o777 == 0o700
        assert "data_dir_permissions" not in checks and checks["folder:data"].ok
    finally:
        os.umask(old)


def test_serve_start_up_and_backup_make_a_missing_data_folder_private(make: Make, tmp_path: Path) -> None:
    """With the database elsewhere (PostgreSQL), nothing made the data folder 0700: `serve`'s
    start-up made `<data dir>/codex-home` (and with it the data folder, 0755) before its checks
    ran, and its own `data_dir_permissions` then warned, a refusal with RUNNER_PRODUCTION=true;
    `backup` made `<data dir>/backups` the same way."""
    old = os.umask(0o022)
    try:
        db = f"sqlite:///{tmp_path / 'db' / 'runner.db'}"
        settings, _ = make(database_url=db, RUNNER_DATA_DIR=str(tmp_path / "d1"))
        rt = Runtime.open(settings)
        try:
            from codex_runner.ops.service import on_startup

            on_startup(rt)
        finally:
            rt.close()
        assert settings.data_dir.stat().st_mode & 0o777 == 0o700
        assert not [c for c in rt.startup_checks if c["name"] == "data_dir_permissions"]

        from codex_runner.ops.backup import backup

        other, _ = make(database_url=db, RUNNER_DATA_DIR=str(tmp_path / "d2"))
        backup(other)
        assert other.data_dir.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def test_spare_watch_warns_when_inotify_is_missing(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = make()  # the demo repo: a local repo in `worktree` mode, warm workspaces on
    assert checks_of(settings)["spare_watch"].ok
    assert (
        "no warm workspaces"
        in checks_of(dataclasses.replace(settings, warm_workspaces=0))["spare_watch"].message
    )

    def no_inotify() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(doctor.spare_watch, "INotify", no_inotify)
    check = checks_of(settings)["spare_watch"]
    assert not check.ok and not check.blocking and check.level == "warn"
    assert "inotify" in check.message and "file by file" in check.message
    # Production mode does not make it a failure: warm workspaces still work, only slower.
    assert not checks_of(dataclasses.replace(settings, production=True))["spare_watch"].blocking


def test_a_credential_that_could_never_be_used_is_refused(make: Make, database_url: str) -> None:
    """A repo names a credential by `[A-Za-z0-9][A-Za-z0-9._-]*`, git asks for it by host, and its
    credential protocol is line-based: `credentials set` stored any name, host and secret."""
    from codex_runner.errors import InvalidRequest

    settings, _ = make(database_url=database_url, RUNNER_ENCRYPTION_KEY=generate_key())
    rt = Runtime.open(settings)
    try:
        for name, host, username, secret, words in (
            ("bad name", "github.com", "oauth2", "s3cret", "credential name"),
            ("gh", "-oProxyCommand=x", "oauth2", "s3cret", "credential host"),
            ("gh", "git hub.com", "oauth2", "s3cret", "credential host"),
            ("gh", "github.com", "oauth2", "line1\nline2", "one line"),
            ("gh", "github.com", "me\r", "s3cret", "one line"),
        ):
            with pytest.raises(InvalidRequest, match=words):
                rt.credentials.set(name, host, username, secret)
        rt.credentials.set("gh.main_2", "git.example.com:8443", "oauth2", "s3cret")
        assert [c["name"] for c in rt.credentials.list()] == ["gh.main_2"]
    finally:
        rt.close()


def test_the_clock_is_checked_against_the_database_servers(
    make: Make, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock is off the PostgreSQL server's writes job times and idempotency windows
    off by as much: a warning (heartbeats go by the server's clock, so never a refusal)."""
    settings, _ = make(database_url=database_url)
    if not settings.database_url.startswith("postgresql"):
        assert "clock" not in checks_of(settings)  # SQLite: one host, one clock
        return
    assert checks_of(settings)["clock"].ok
    real = doctor.time.time
    for offset, level in ((-3.0, "warn"), (3.0, "warn"), (-500.0, "warn")):
        monkeypatch.setattr(doctor.time, "time", lambda offset=offset: real() + offset)
        check = checks_of(settings)["clock"]
        assert check.level == level and "NTP" in check.message, check
    assert "behind" in check.message  # this host's clock reads 500 s less than the server's
    prod = checks_of(dataclasses.replace(settings, production=True))["clock"]
    assert prod.level == "warn" and not prod.blocking


def test_doctor_json_is_masked_like_its_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The text lines went through the CLI's masking of the runner's own secrets, `--json` did
    not: a check that quoted a setting would have printed it in clear there."""
    from typer.testing import CliRunner

    from codex_runner.cli import app
    from codex_runner.ops import doctor as doctor_module
    from codex_runner.ops.doctor import Check

    secret = "jwt-" + "s3cr3t" * 6
    quoting = Check("quoting", ok=False, blocking=False, message=f"saw {secret}", detail={"v": [secret]})
    monkeypatch.setattr(doctor_module, "run_checks", lambda *_: [quoting])
    env = {"RUNNER_DATA_DIR": str(tmp_path / "data"), "RUNNER_JWT_SECRET": secret}
    for args in (["doctor"], ["doctor", "--json"]):
        done = CliRunner().invoke(app, args, env=env)
        assert done.exit_code == 0, done.output
        assert "saw" in done.output and secret not in done.output, done.output


def test_job_isolation_is_tried_for_real_and_reported(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """Landlock keeps jobs out of the runner's files (docs/execution.md, "Job isolation"): ok where
    the kernel confines a thread; without it a warning (`auto`: jobs run unconfined), a failure in
    production mode or with `required`; `off` is the operator's choice, a warning."""
    from codex_runner.execution import sandbox

    settings, _ = make()
    if sandbox.abi_version() > 0:
        assert checks_of(settings)["job_isolation"].ok
    monkeypatch.setattr(sandbox, "abi_version", lambda: 0)
    check = checks_of(settings)["job_isolation"]
    assert check.level == "warn" and "Landlock" in check.message and "can read" in check.message
    assert_fails(checks_of(make_healthy_production(settings))["job_isolation"], "Landlock")
    assert_fails(
        checks_of(dataclasses.replace(settings, job_isolation="required"))["job_isolation"], "required"
    )
    off = checks_of(dataclasses.replace(settings, job_isolation="off", production=True))["job_isolation"]
    assert off.level == "warn" and "RUNNER_JOB_ISOLATION=off" in off.message
