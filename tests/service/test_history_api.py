"""GET /v2/requests and GET /v1/usage in-process on SQLite and on a real redis-server: the key's
own records, filters, pagination, usage totals, and history that outlives an expired result."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qwenserve.store.base import Store
from tests.service.inprocess import Harness, make_harness, open_test_store


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path):
        yield harness


async def test_list_pages_filters_and_usage(api: Harness) -> None:
    ids = [await api.submit(seed=i) for i in range(5)]
    job = api.claim()
    api.complete(job.id)
    other, _ = api.new_key()
    await api.http.post("/v2/qwen-image-fast", json={"prompt": "x"}, headers=api.headers(other))

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await api.http.get("/v2/requests", params=params, headers=api.headers())).json()
        seen += [r["request_id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5, "own records only, each once"
    done = await api.http.get("/v2/requests?status=completed", headers=api.headers())
    [record] = done.json()["data"]
    assert record["request_id"] == job.id and record["model"] == "qwen-image-fast"
    assert record["inference_time"] == pytest.approx(1.5) and record["cost"] > 0
    assert "prompt" not in record
    bad = await api.http.get("/v2/requests?limit=101", headers=api.headers())
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "limit"
    iso = await api.http.get("/v2/requests?since=2000-01-01T00:00:00Z", headers=api.headers())
    assert len(iso.json()["data"]) == 5

    usage = (await api.http.get("/v1/usage", headers=api.headers())).json()
    [row] = usage["data"]
    assert row["count"] == 5 and row["model"] == "qwen-image-fast"
    assert usage["total"]["cost_usd"] == pytest.approx(10.0 - await api.credits())
    assert usage["total"]["gpu_seconds"] == pytest.approx(1.5)


async def test_history_outlives_the_expired_result(api: Harness) -> None:
    request_id = await api.submit()
    api.complete(api.claim().id)
    api.clock.advance(api.services.settings.result_ttl_s + 1)
    api.store.purge_expired(now=api.clock.now)
    assert (await api.status(request_id)).status_code == 404
    listed = (await api.http.get("/v2/requests", headers=api.headers())).json()["data"]
    assert [r["request_id"] for r in listed] == [request_id]
    assert listed[0]["status"] == "COMPLETED"
