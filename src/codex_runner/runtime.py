"""Wires settings → database → stores → catalog. The API, the CLI and the launcher all call the
same service functions here, so there is one way to do each thing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.engine import Engine

from codex_runner.catalog import Catalog
from codex_runner.config import Settings
from codex_runner.errors import InvalidRequest
from codex_runner.ops.metrics import Metrics
from codex_runner.secrets import parse_key
from codex_runner.store import JobStore, create_store_engine
from codex_runner.store.admin import CredentialStore, Principal, TokenStore
from codex_runner.store.creates import CreateOutcome
from codex_runner.store.engine import APPLICATION_NAME, DatabaseProbe
from codex_runner.store.jobs import Limits, NewJob
from codex_runner.store.migrate import upgrade

MAX_IDEMPOTENCY_KEY = 255

log = structlog.get_logger("codex_runner.runtime")


def validate_idempotency_key(key: str | None) -> str | None:
    """SPEC §4: 1–255 printable ASCII characters. The blanks around a header's value are not part
    of it (RFC 9110 §5.5): the HTTP parser drops the leading ones only, and `k ` made a second job."""
    if key is None:
        return None
    key = key.strip(" \t")
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or any(not (0x20 <= ord(c) <= 0x7E) for c in key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters",
            errors=[
                {"loc": ["header", "Idempotency-Key"], "msg": "expected 1-255 printable ASCII characters"}
            ],
        )
    return key


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    catalog: Catalog
    jobs: JobStore
    tokens: TokenStore
    credentials: CredentialStore
    metrics: Metrics = field(default_factory=Metrics)
    # Called after a job is created or a cancel is requested in this process: the launcher
    # hooks in here so it wakes at once instead of waiting for its next poll.
    on_created: list[Callable[[str], None]] = field(default_factory=list)
    on_cancel: list[Callable[[str], None]] = field(default_factory=list)
    startup_checks: list[dict[str, Any]] = field(default_factory=list)
    probe: DatabaseProbe | None = None  # `/readyz`'s, made on first use
    # Log streams open in this process, by user (api/logs.py `StreamSlot`).
    open_streams: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True, catalog: Catalog | None = None) -> Runtime:
        catalog = catalog or Catalog.from_settings(settings)
        engine = create_store_engine(
            settings.database_url,
            answer_timeout=settings.db_answer_timeout_seconds,
            application_name=f"{APPLICATION_NAME} {settings.id}",
        )
        if migrate:
            upgrade(engine)
        key = parse_key(settings.encryption_key) if settings.encryption_key else None
        previous = [parse_key(settings.encryption_key_previous)] if settings.encryption_key_previous else []
        rt = cls(
            settings=settings,
            engine=engine,
            catalog=catalog,
            jobs=JobStore(engine),
            tokens=TokenStore(engine),
            credentials=CredentialStore(engine, key, previous),
        )
        rt.jobs.listeners.append(rt.metrics.on_event)
        if migrate:
            rt.jobs.sync_repos(
                {
                    "id": r.id,
                    "name": r.name,
                    "source_type": r.source_type,
                    "path_or_url": r.public_url(),
                    "branch": r.branch,
                    "workspace": r.workspace,
                    "enabled": r.enabled,
                }
                for r in catalog.repos.values()
            )
        return rt

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
        self.engine.dispose()

    def database_probe(self) -> DatabaseProbe:
        if self.probe is None:
            self.probe = DatabaseProbe(self.settings.database_url)
        return self.probe

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(s.max_queue_size, s.max_queued_per_user, s.idempotency_window_seconds)

    def create_job(
        self, principal: Principal, body: dict[str, Any], idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Validates against the catalog, then creates (or replays) the job."""
        outcome = self.create_jobs([self.new_job(principal, body, idempotency_key)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def new_job(
        self, principal: Principal, body: Mapping[str, Any], idempotency_key: str | None = None
    ) -> NewJob:
        """The job a request asks for, checked against the catalog; raises `InvalidRequest` and
        `Forbidden` kinds."""
        idempotency_key = validate_idempotency_key(idempotency_key)
        repo, script, args = self.catalog.resolve(
            repo_id=body.get("repo_id"),
            repo_name=body.get("repo"),
            script_key=body.get("script_key", ""),
            args=body.get("args", {}),
        )
        return NewJob(
            repo_id=repo.id,
            repo_name=repo.name,
            workspace_mode=repo.workspace,
            script_key=script.key,
            args=args,
            defaults=script.defaults(),
            timeout_seconds=script.timeout_seconds,
            requested_by=principal.user,
            idempotency_key=idempotency_key,
        )

    def create_jobs(self, items: Sequence[NewJob]) -> list[CreateOutcome]:
        """Creates (or replays) several jobs in one transaction (group commit); each item gets its
        own answer, a refused one (`QueueFull`, `IdempotencyConflict`) as its error."""
        outcomes = self.jobs.create_many(items, self.limits)
        for outcome in outcomes:
            if not isinstance(outcome, Exception) and not outcome[1]:
                for hook in self.on_created:
                    hook(outcome[0]["id"])
        return outcomes

    def cancel_job(self, principal: Principal, job_id: str) -> tuple[dict[str, Any], int]:
        job, code = self.jobs.cancel(
            job_id, owner=None if principal.is_admin else principal.user, actor=principal.user
        )
        if job["status"] == "cancel_requested":
            for hook in self.on_cancel:
                hook(job_id)
        elif code == 200:
            # A queued job's cancel is its terminal transition: no launcher sees it, so it is logged
            # here (SPEC §8; the launcher and JobRun log the others). It never ran: no duration.
            log.info(
                "job_finished",
                job_id=job_id,
                script_key=job.get("script_key"),
                status_from="queued",
                status_to="canceled",
                duration_ms=None,
            )
        return job, code

    @staticmethod
    def owner_of(principal: Principal) -> str | None:
        """None means "every user's jobs" (admins); a user only ever sees its own."""
        return None if principal.is_admin else principal.user
