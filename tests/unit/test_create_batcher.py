"""The create queue's mechanics: a cancelled drain (server shutdown) answers every waiting request
instead of leaving it hanging."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from codex_runner.api import create
from codex_runner.api.create import CreateBatcher, CreateRequest
from codex_runner.errors import StoreUnavailable

pytestmark = pytest.mark.timeout(30)


def test_a_cancelled_drain_answers_every_waiting_request(monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()

    def stuck_batch(runtime: Any, requests: list[CreateRequest]) -> list[Any]:
        entered.set()
        release.wait(10)  # the database never answers while the server shuts down
        return [({"id": "x"}, False)] * len(requests)

    monkeypatch.setattr(create, "run_batch", stuck_batch)

    async def scenario() -> list[BaseException | tuple[dict[str, Any], bool]]:
        batcher = CreateBatcher(runtime=None)  # type: ignore[arg-type]
        request = CreateRequest("t", b"{}", "application/json", None)
        first = asyncio.create_task(batcher.submit(request))
        await asyncio.to_thread(entered.wait, 10)
        second = asyncio.create_task(batcher.submit(request))  # queued behind the stuck batch
        await asyncio.sleep(0)
        assert batcher._drainer is not None
        batcher._drainer.cancel()
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)
        release.set()
        return results

    results = asyncio.run(scenario())
    assert [type(r) for r in results] == [StoreUnavailable, StoreUnavailable]
