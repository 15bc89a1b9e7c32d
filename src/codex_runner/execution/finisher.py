"""Group commit of the jobs' terminal writes.

A trivial job costs the runner more in its end than in its run: the log's last line, the fsynced
terminal manifest, a write transaction with its event row, the manifest's rename, and a thread trip
for all of it. Jobs that end while a commit is in flight wait for the next one, and that one takes
them all: one thread trip, one transaction (each job still its own compare-and-set on status and
lease, so a lost lease fails only its own job), and two rounds of fsyncs made side by side
(`manifest.Fsyncs`: the manifests while the transaction runs, their folders after it while the
jobs the batch claimed start) instead of two per job, one after the other, ahead of the
transaction. A lone job commits at once. While other jobs of the launcher still run, a batch
waits up to `LINGER_SECONDS` for their endings to join it, as PostgreSQL's `commit_delay` waits for
sibling transactions: real jobs run for seconds, so it costs their ends at most that; trivial jobs
end within it, and once they end together the jobs claimed in their place start together and end
together too, so the batches stay full (at concurrency 2 a batch would otherwise hold one job, and
a job cost 30% more CPU). The launcher may have the same transaction claim the jobs that take the
freed slots (`ClaimHook`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from codex_runner.errors import StoreUnavailable
from codex_runner.execution.manifest import Fsyncs, OwedManifests
from codex_runner.store.jobs import ClaimedJob, ClaimRequest, JobStore, OwnerWrite

log = structlog.get_logger("codex_runner.finisher")

#: How long a batch waits for the endings of the launcher's jobs that still run (see above).
LINGER_SECONDS = 0.002

#: Which of a write's attempts matched (None: none did), or why the write could not be made.
Outcome = int | None | BaseException


@dataclass(frozen=True)
class Ending:
    """One job's terminal write and what goes around it, both run in the committing thread:
    `before` ahead of the transaction (the log's last line, the manifest in a temporary file),
    `after` once it is over, with the outcome (publish the manifest, or write the one of the real
    outcome). Each may return a path the committer must fsync: `before`'s before any `after` runs
    (during the transaction), `after`'s before the job hears its outcome (while the jobs claimed
    along start)."""

    write: OwnerWrite
    before: Callable[[], str | None]
    after: Callable[[Outcome], str | None]
    #: Right after the transaction, ahead of any wait for an fsync: what must follow the status
    #: at once (the service log line of the transition).
    written: Callable[[Outcome], None] | None = None


class ClaimHook(Protocol):
    """The launcher's side of a claim made along with a batch. `begin` (on the loop, before the
    trip) takes the launcher's claim turn and says what to claim, given that the jobs `ending` end
    in this batch; `end` (on the loop, after) counts them out, starts what was claimed and gives
    the turn back. Every `begin` is followed by one `end`, with the error when the trip failed.
    `holding` counts the launcher's jobs that hold a slot, those ending included: the most a batch
    could hold."""

    def holding(self) -> int: ...

    async def begin(self, ending: list[str]) -> ClaimRequest | None: ...

    def end(self, ending: list[str], claimed: list[ClaimedJob], error: BaseException | None) -> None: ...


class GroupCommitter:
    """Commits `Ending`s in batches; one per launcher (tests may give each job its own)."""

    def __init__(
        self, store: JobStore, claims: ClaimHook | None = None, *, linger: float = LINGER_SECONDS
    ) -> None:
        self.store = store
        self.claims = claims
        self.linger = linger
        self._queue: list[tuple[Ending, asyncio.Future[Outcome]]] = []
        self._task: asyncio.Task[None] | None = None
        # Resolved by the next ending while a batch lingers (`_gather`).
        self._more: asyncio.Future[None] | None = None
        #: Terminal manifests the disk refused, for the launcher's heartbeats to write again.
        self.owed_manifests = OwedManifests()

    async def commit(self, ending: Ending) -> int | None:
        """Waits for the batch that holds `ending`; the index of the attempt that matched, or
        None. Raises what the write raised (StoreUnavailable once the launcher stops waiting)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._queue.append((ending, future))
        if self._more is not None and not self._more.done():
            self._more.set_result(None)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name="group-commit")
        # Shielded: a cancelled job task must not drop a write other jobs' batch already carries.
        outcome = await asyncio.shield(future)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._gather()
                batch, self._queue = self._queue, []
                await self._run(batch)
        except BaseException as exc:
            # Cancelled at shutdown (or a claim turn that failed): the endings queued meanwhile
            # hear it too rather than wait for a next job's end that may never come.
            waiting, self._queue = self._queue, []
            _settle(waiting, [exc] * len(waiting))
            raise

    async def _run(self, batch: list[tuple[Ending, asyncio.Future[Outcome]]]) -> None:
        """One batch: the claim turn, the thread trip, the folders' fsyncs; every job of the batch
        hears its outcome, whatever happens."""
        ids = [ending.write.job_id for ending, _ in batch]
        try:
            request = await self.claims.begin(ids) if self.claims is not None else None
        except BaseException as exc:  # e.g. cancelled at shutdown: no job may wait forever
            _settle(batch, [exc] * len(batch))
            raise
        claimed: list[ClaimedJob] = []
        error: BaseException | None = None
        folders: Fsyncs | None = None
        try:
            outcomes, claimed, folders = await asyncio.to_thread(
                self._commit, [ending for ending, _ in batch], request
            )
        except BaseException as exc:  # the thread itself failed: every job of the batch hears of it
            outcomes, error = [exc] * len(batch), exc
        finally:
            # The claimed jobs start now, while the folders of the ended ones sync.
            if self.claims is not None:
                self.claims.end(ids, claimed, error)
        try:
            if folders is not None:
                _report(await folders.wait_async())
        finally:  # cancelled at shutdown: the writes are made, their jobs hear of them
            _settle(batch, outcomes)

    async def _gather(self) -> None:
        """Waits while jobs of the launcher that have not ended yet still hold slots, for their
        endings to join the batch: until every slot's job has ended, or `linger` seconds."""
        if self.claims is None or self.linger <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger
        while self.claims.holding() > len(self._queue):
            left = deadline - loop.time()
            if left <= 0:
                return
            self._more = more = loop.create_future()
            try:
                await asyncio.wait({more}, timeout=left)
            finally:
                self._more = None

    def _commit(
        self, endings: Sequence[Ending], claim: ClaimRequest | None
    ) -> tuple[list[Outcome], list[ClaimedJob], Fsyncs]:
        """Worker thread: every `before`, one transaction (and the claim, if any) while their
        fsyncs run, every `after`; returns with their fsyncs started (the caller waits for them,
        the claimed jobs need not)."""
        outcomes: list[Outcome] = [None] * len(endings)
        ready: list[int] = []
        to_sync: list[str] = []
        for i, ending in enumerate(endings):
            try:
                path = ending.before()
                ready.append(i)
            except Exception as exc:
                outcomes[i] = exc
                continue
            if path is not None:
                to_sync.append(path)
        # The manifests are synced while the transaction runs: neither waits for the other, and
        # each is done before any manifest is published (renamed) in `after`.
        syncing = Fsyncs(to_sync)
        try:
            written, claimed = self._write([endings[i].write for i in ready], claim)
            for i, outcome in zip(ready, written, strict=True):
                told = endings[i].written
                if told is not None:
                    try:
                        told(outcome)
                    except Exception:
                        log.exception("job_ending_failed", job_id=endings[i].write.job_id)
        finally:
            _report(syncing.wait())
        to_sync = []
        for i, outcome in zip(ready, written, strict=True):
            outcomes[i] = outcome
            try:
                path = endings[i].after(outcome)
            except Exception:
                log.exception("job_ending_failed", job_id=endings[i].write.job_id)
                continue
            if path is not None:
                to_sync.append(path)
        return outcomes, claimed, Fsyncs(to_sync)

    def _write(
        self, writes: list[OwnerWrite], claim: ClaimRequest | None = None
    ) -> tuple[list[Outcome], list[ClaimedJob]]:
        if not writes and claim is None:
            return [], []
        try:
            held, claimed = self.store.finish_many(writes, claim)
            return list(held), claimed
        except StoreUnavailable as exc:
            # The store waited all it would (the launcher is giving up): alone they would too.
            return [exc] * len(writes), []
        except Exception as exc:
            if len(writes) <= 1 and claim is None:
                return [exc] * len(writes), []
        # A write the database refused (not a lost compare-and-set, which is no error): each in a
        # transaction of its own, so only the faulty one fails; the claim waits for the claim loop.
        return [self._write([write])[0][0] for write in writes], []


def _report(failed: list[tuple[str, OSError]]) -> None:
    """A failed fsync leaves the file as readers see it (complete, published by rename) but not
    sure to outlive a power cut: worth a warning, not a failed job."""
    for path, exc in failed:
        log.warning("manifest_sync_failed", path=path, error=exc.strerror)


def _settle(waiting: list[tuple[Ending, asyncio.Future[Outcome]]], outcomes: Sequence[Outcome]) -> None:
    """Each job of `waiting` hears its outcome (once: a future already done keeps its own)."""
    for (_, future), outcome in zip(waiting, outcomes, strict=True):
        if not future.done():
            future.set_result(outcome)
