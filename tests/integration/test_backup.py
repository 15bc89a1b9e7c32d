"""Backup and restore on SQLite and PostgreSQL: a wipe and a restore give back every job, event and
log byte for byte; a damaged archive is refused before anything changes; a live instance blocks a
restore unless forced; PostgreSQL tools never see a credential in their argument list."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from codex_runner.config import Settings, load_settings
from codex_runner.jobs import Status
from codex_runner.ops.backup import BackupError, backup, list_backups, live_instances, newest_backup, restore
from codex_runner.runtime import Runtime
from codex_runner.store import create_store_engine
from codex_runner.store.admin import Principal
from codex_runner.store.instances import InstanceRegistry
from codex_runner.store.schema import events, instances, jobs, metadata

from tests.helpers import write_scratch_echo_config
from tests.integration.ops_cli import run_cli


def make_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    write_scratch_echo_config(tmp_path)
    return {
        "RUNNER_DATABASE_URL": database_url,
        "RUNNER_DATA_DIR": str(tmp_path / "data"),
        "RUNNER_ID": "test-backup",
        "RUNNER_ENABLED": "false",
    }


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return make_env(tmp_path, database_url)


@pytest.fixture
def settings(tmp_path: Path, env: dict[str, str]) -> Settings:
    return load_settings(env, cwd=tmp_path)


def populate(settings: Settings) -> None:
    rt = Runtime.open(settings)
    try:
        alice = Principal("alice", "user")
        ids = []
        for i in range(12):
            job, _ = rt.create_job(
                alice, {"repo": "demo", "script_key": "echo", "args": {"message": f"m{i}"}}, f"k{i}"
            )
            ids.append(job["id"])
        claimed = rt.jobs.claim("test-backup", slots=6, max_jobs_per_user=10)
        for n, c in enumerate(claimed):
            final = [Status.SUCCESS, Status.FAILED, Status.TIMEOUT][n % 3]
            rt.jobs.transition(c.id, Status.RUNNING, final, lease_token=c.lease_token, message=f"done {n}")
        rt.cancel_job(alice, ids[-1])
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        for n, job_id in enumerate(ids):
            # Bytes that are not UTF-8, a NUL, a CR: the log must come back exactly.
            (settings.log_dir / f"{job_id}.log").write_bytes(bytes(range(256)) * (n + 1) + b"\r\n\x00end")
            run = settings.runs_dir / job_id
            run.mkdir(parents=True)
            (run / "manifest.json").write_text(json.dumps({"job_id": job_id, "n": n}))
            (run / ".heartbeat").touch()
    finally:
        rt.close()


def snapshot(settings: Settings) -> dict[str, Any]:
    engine = create_store_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            job_rows = [dict(r) for r in conn.execute(sa.select(jobs).order_by(jobs.c.id)).mappings()]
            event_rows = [dict(r) for r in conn.execute(sa.select(events).order_by(events.c.id)).mappings()]
    finally:
        engine.dispose()
    files = {}
    for root in (settings.log_dir, settings.runs_dir):
        if root.exists():
            for p in sorted(root.rglob("*")):
                if p.is_file() and p.name != ".heartbeat":
                    files[str(p.relative_to(settings.data_dir))] = p.read_bytes()
    return {"jobs": job_rows, "events": event_rows, "files": files}


def wipe(settings: Settings) -> None:
    if settings.is_sqlite:
        db = Path(sa.engine.make_url(settings.database_url).database or "")
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    else:
        engine = create_store_engine(settings.database_url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
        engine.dispose()
    shutil.rmtree(settings.log_dir)
    shutil.rmtree(settings.runs_dir)


@pytest.fixture
def populated(settings: Settings) -> Iterator[dict[str, Any]]:
    populate(settings)
    yield snapshot(settings)


def test_backup_wipe_restore_roundtrip(settings: Settings, populated: dict[str, Any]) -> None:
    assert len(populated["jobs"]) == 12 and len(populated["events"]) > 12
    result = backup(settings)
    assert result.path.parent == settings.backup_dir
    assert result.path.name.startswith("runner-") and result.path.name.endswith(".tar.gz")
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600
    assert newest_backup(settings.backup_dir) is not None
    with tarfile.open(result.path) as tar:
        names = tar.getnames()
    assert names[-1] == "MANIFEST.json"
    assert sum(n.startswith("logs/") for n in names) == 12
    assert sum(n.startswith("runs/") for n in names) == 12  # manifests only, no .heartbeat

    wipe(settings)
    assert not settings.log_dir.exists()
    restored = restore(settings, result.path)
    assert (restored.logs, restored.manifests) == (12, 12)
    assert snapshot(settings) == populated

    # The restored database is usable as is: the runtime opens it and sees the jobs.
    rt = Runtime.open(settings)
    try:
        _, total = rt.jobs.list_jobs(limit=200)
        assert total == 12
    finally:
        rt.close()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _repack_with_changed_log(src: Path, dest: Path) -> None:
    """A well-formed gzip tar whose one log differs from what its manifest says."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w:gz") as tout:
        changed = False
        for info in tin:
            data = tin.extractfile(info).read()  # type: ignore[union-attr]
            if info.name.startswith("logs/") and not changed:
                data = data.replace(b"end", b"END")
                changed = True
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "damage", ["flip_with_sidecar", "flip_without_sidecar", "member_changed", "not_gzip"]
)
def test_damaged_archive_is_refused_and_nothing_changes(
    settings: Settings, populated: dict[str, Any], tmp_path: Path, damage: str
) -> None:
    good = backup(settings).path
    bad = tmp_path / "bad" / good.name
    bad.parent.mkdir()
    if damage == "member_changed":
        _repack_with_changed_log(good, bad)
    elif damage == "not_gzip":
        bad.write_bytes(gzip.decompress(good.read_bytes())[:5000])
    else:
        shutil.copy(good, bad)
        if damage == "flip_with_sidecar":
            shutil.copy(good.with_name(good.name + ".sha256"), bad.with_name(bad.name + ".sha256"))
        _flip_byte(bad)
    # Change the live state after the backup: a refused restore must leave this state, not the backup's.
    (settings.log_dir / "extra.log").write_bytes(b"after the backup")
    before = snapshot(settings)
    with pytest.raises(BackupError) as err:
        restore(settings, bad)
    assert bad.name in str(err.value) and "\n" not in str(err.value)
    assert snapshot(settings) == before
    assert not list(settings.data_dir.glob(".restore-*"))


def test_restore_refuses_while_an_instance_is_live(settings: Settings, populated: dict[str, Any]) -> None:
    archive = backup(settings).path
    engine = create_store_engine(settings.database_url)
    InstanceRegistry(engine, "busy-runner").register()
    engine.dispose()
    (settings.log_dir / "extra.log").write_bytes(b"after the backup")
    before = snapshot(settings)
    with pytest.raises(BackupError, match=r"busy-runner.*live"):
        restore(settings, archive)
    assert snapshot(settings) == before
    restore(settings, archive, force=True)
    after = snapshot(settings)
    assert after["jobs"] == populated["jobs"] and after["events"] == populated["events"]


def test_a_restore_marks_the_instances_of_the_archive_stopped(
    settings: Settings, populated: dict[str, Any]
) -> None:
    """An archive of a live system holds its instances' rows, heartbeats of the backup's second:
    restored as they were, they looked live for RUNNER_STALE_AFTER_SECONDS when nothing ran, so a
    second restore (a drill) refused ("are live: stop them first") and a `serve` on another host
    under one of those ids waited that long. No instance was live when the restore began (else it
    refuses), so none of those rows is a process's: the restore marks them stopped."""
    engine = create_store_engine(settings.database_url)
    registry = InstanceRegistry(engine, "live-at-backup")
    registry.register()
    archive = backup(settings).path
    registry.stopped()  # the operator stops it, then restores
    engine.dispose()
    assert live_instances(settings) == []
    restore(settings, archive)
    assert live_instances(settings) == []
    restore(settings, archive)  # a second restore right away: nothing is live
    engine = create_store_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(instances.c.stopped_at).where(instances.c.id == "live-at-backup")
            ).one()
    finally:
        engine.dispose()
    assert row.stopped_at is not None


def test_backup_retention_days_deletes_old_archives(settings: Settings, populated: dict[str, Any]) -> None:
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    old = settings.backup_dir / "runner-20200101T000000Z.tar.gz"
    old.write_bytes(b"old")
    old.with_name(old.name + ".sha256").write_text("x  " + old.name)
    unrelated = settings.backup_dir / "notes.txt"
    unrelated.write_text("keep me")
    result = backup(settings, retention_days=7)
    assert result.deleted == [old]
    assert not old.exists() and not old.with_name(old.name + ".sha256").exists()
    assert unrelated.exists() and result.path.exists()
    assert [p for _, p in list_backups(settings.backup_dir)] == [result.path]


def test_cli_backup_restore_and_corrupt_archive(
    tmp_path: Path, env: dict[str, str], settings: Settings, populated: dict[str, Any]
) -> None:
    out = tmp_path / "elsewhere"
    done = run_cli(["backup", "--out", str(out)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    archive = Path(done.stdout.strip())
    assert archive.parent == out and archive.exists()
    wipe(settings)
    done = run_cli(["restore", str(archive)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert snapshot(settings) == populated
    _flip_byte(archive)
    done = run_cli(["restore", str(archive)], env, tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checksum" in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.postgres
def test_pg_tools_get_credentials_from_the_environment_only(
    tmp_path: Path, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Trust authentication ignores the password, so the URL can carry one to look for.
    url = pg_database_url.replace("postgres@", "postgres:Sup3r-s3cret-pw@")
    settings = load_settings(make_env(tmp_path, url), cwd=tmp_path)
    populate(settings)
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    for tool in ("pg_dump", "pg_restore"):
        real = shutil.which(tool)
        assert real is not None
        script = spy_dir / tool
        script.write_text(
            "#!/usr/bin/env python3\n"
            "import json, os, sys\n"
            f"with open({str(record)!r}, 'a') as f:\n"
            "    f.write(json.dumps({'argv': sys.argv, 'pw': os.environ.get('PGPASSWORD'),"
            " 'db': os.environ.get('PGDATABASE')}) + '\\n')\n"
            f"os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n"
        )
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{spy_dir}:{os.environ['PATH']}")
    before = snapshot(settings)
    archive = backup(settings).path
    wipe(settings)
    restore(settings, archive)
    assert snapshot(settings) == before
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [Path(c["argv"][0]).name for c in calls] == ["pg_dump", "pg_restore"]
    for call in calls:
        assert call["pw"] == "Sup3r-s3cret-pw"
        assert call["db"] == sa.engine.make_url(url).database
        assert not any("Sup3r" in a or "postgres" in a or "127.0.0.1" in a for a in call["argv"])


@pytest.mark.postgres
def test_missing_pg_dump_is_a_clear_error(
    tmp_path: Path, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(make_env(tmp_path, pg_database_url), cwd=tmp_path)
    engine = create_store_engine(pg_database_url)
    metadata.create_all(engine)
    engine.dispose()
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(BackupError, match="pg_dump is not installed"):
        backup(settings)
    assert not list(settings.backup_dir.glob("runner-*"))


def test_a_backup_from_before_an_upgrade_restores_and_migrates_again(settings: Settings) -> None:
    """docs/operations.md's rollback: a backup taken at an older schema, restored over the newer
    one, leaves none of the newer tables, functions or triggers behind, so the next start
    migrates it to head again (PostgreSQL's `pg_restore --clean` drops only what the dump holds)."""
    from alembic import command

    from codex_runner.store.migrate import _config, current_revision, upgrade

    engine = create_store_engine(settings.database_url)
    try:
        cfg = _config()
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            conn.commit()
        old = backup(settings)
        upgrade(engine)  # the new version
        head = current_revision(engine)
        assert head != "0001"
        restore(settings, old.path)  # rolled back
        assert current_revision(engine) == "0001"
        upgrade(engine)  # and upgraded again
        assert current_revision(engine) == head
    finally:
        engine.dispose()
    populate(settings)  # the counts' triggers work again
    rt = Runtime.open(settings)
    try:
        assert rt.jobs.list_jobs(limit=1)[1] == 12
    finally:
        rt.close()


def test_restore_refuses_while_an_api_only_serve_is_live(
    settings: Settings, populated: dict[str, Any]
) -> None:
    """An API-only `serve` (RUNNER_ENABLED=false) has no launcher, but it writes to the database:
    it heartbeats an instance row of its own while it runs, so `restore` sees it and refuses."""
    from codex_runner.server import build_app

    from tests.helpers import serve_app

    archive = backup(settings).path
    assert not settings.enabled
    runtime = Runtime.open(settings)
    try:
        with serve_app(build_app(runtime)):
            live = live_instances(settings)
            assert [i for i in live if i.startswith("test-backup:api:")], live
            with pytest.raises(BackupError, match="live"):
                restore(settings, archive)
        assert live_instances(settings) == []  # its row goes with it
    finally:
        runtime.close()
    restore(settings, archive)


def test_an_archive_from_a_newer_schema_is_refused_before_anything_changes(
    settings: Settings, populated: dict[str, Any]
) -> None:
    """A backup made by a newer codex-runner (a schema revision this version does not know) would
    replace a working database with one that `serve`, `worker`, `migrate` and every admin command
    then refuse: restore says so and leaves the database as it was."""
    from codex_runner.store.migrate import current_revision, head_revision

    head = head_revision()
    engine = create_store_engine(settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        newer = backup(settings)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM runner_job_events"))  # changed after the backup
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :head"), {"head": head})
        before = snapshot(settings)
        with pytest.raises(BackupError, match="newer") as err:
            restore(settings, newer.path)
        assert "\n" not in str(err.value)
        assert snapshot(settings) == before
        assert current_revision(engine) == head
    finally:
        engine.dispose()


def test_two_backups_in_the_same_second_keep_both_archives(
    settings: Settings, populated: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cron backup and one by hand, started in the same second: each keeps its own archive. Both
    used to take the one name free at their start, and the later rename replaced the earlier
    archive, whose command had printed that path with a SHA-256 the file no longer had."""
    import threading
    from datetime import UTC, datetime

    from codex_runner.ops import backup as backup_module

    both_dumped = threading.Barrier(2, timeout=30)
    dump = backup_module._dump_database

    def dump_then_wait(*args: Any) -> Any:
        result = dump(*args)
        both_dumped.wait()  # each has dumped (and, before the fix, chosen its name)
        return result

    monkeypatch.setattr(backup_module, "_dump_database", dump_then_wait)
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(backup(settings, now=now))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2
    assert results[0].path != results[1].path
    for r in results:
        assert r.path.name.startswith("runner-20300102T030405Z")
        assert backup_module._file_sha256(r.path) == r.sha256
        assert r.path.with_name(r.path.name + ".sha256").read_text().split()[0] == r.sha256
    assert len(list_backups(settings.backup_dir)) == 2
