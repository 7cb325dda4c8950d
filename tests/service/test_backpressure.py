"""Backpressure and start deadlines through the API, in-process on SQLite and a real
redis-server: a full queue (the cluster's QWENSERVE_MAX_QUEUED: 503; a key's max_queued: 429)
refuses a submit on every route with Retry-After before any charge, /readyz follows the
cluster's queue, and X-Start-Timeout ends a job no worker started in time, refunded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwenserve.accounts.keys import create_api_key
from qwenserve.catalog import get_model
from qwenserve.store.base import Store
from tests.service.helpers import body_for
from tests.service.inprocess import Harness, make_harness, open_test_store

SLUG = "qwen-image-fast"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path, max_queued=2):
        yield harness


def v2(api: Harness, key: str | None = None, **headers: str) -> Any:
    return api.http.post(
        f"/v2/{SLUG}", json=body_for(SLUG), headers={**api.headers(key), **headers}
    )


def v1(api: Harness, key: str | None = None, **headers: str) -> Any:
    return api.http.post(
        f"/v1/{SLUG}", json=body_for(SLUG), headers={**api.headers(key), **headers}
    )


def openai(api: Harness, key: str | None = None, **headers: str) -> Any:
    return api.http.post(
        "/v1/images/generations",
        json={"model": SLUG, "prompt": "a red fox"},
        headers={**api.headers(key), **headers},
    )


async def test_a_full_cluster_queue_is_a_503_on_every_route_and_readyz_says_so(
    api: Harness,
) -> None:
    ready = await api.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "queued": 0, "max_queued": 2}
    for _ in range(2):
        assert (await v2(api)).status_code == 200
    credits = await api.credits()
    for answer in (await v2(api), await v1(api), await openai(api)):
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["Retry-After"]) >= 1
        assert "queue is full" in answer.text
    assert (await openai(api)).json()["error"]["type"] == "server_error"  # OpenAI's shape
    assert await api.credits() == pytest.approx(credits), "nothing charged"
    not_ready = await api.http.get("/readyz")
    assert not_ready.status_code == 503 and "Retry-After" in not_ready.headers
    health = await api.http.get("/healthz")
    assert health.status_code == 200 and health.json()["queued"] == 2
    api.claim()  # a worker takes one: room again
    assert (await api.http.get("/readyz")).status_code == 200
    assert (await v2(api)).status_code == 200


async def test_a_keys_own_queue_limit_is_a_429_for_that_key_only(api: Harness) -> None:
    api.services.settings.max_queued = 0
    limited, record = create_api_key(
        api.store, name="small", credits_usd=5.0, rpm=0, now=api.clock.now, max_queued=1
    )
    assert (await v2(api, limited)).status_code == 200
    for answer in (await v2(api, limited), await v1(api, limited), await openai(api, limited)):
        assert answer.status_code == 429, answer.text
        assert int(answer.headers["Retry-After"]) >= 1
        assert "max_queued" in answer.text
    key = api.store.get_key(record.id)
    price = api.services.settings.price_for(SLUG, get_model(SLUG).price_usd)
    assert key is not None and key.balance_usd == pytest.approx(5.0 - price), "one job charged"
    assert (await v2(api)).status_code == 200  # the owner's key is not held
    assert (await v2(api)).status_code == 200


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf", "nan", ""])
async def test_a_bad_start_timeout_is_a_400_naming_the_header(api: Harness, value: str) -> None:
    credits = await api.credits()
    for call in (v2, v1, openai):
        answer = await call(api, **{"X-Start-Timeout": value})
        assert answer.status_code == 400, answer.text
        assert "X-Start-Timeout" in answer.text
    assert await api.credits() == pytest.approx(credits)


async def test_a_job_not_started_by_its_start_timeout_fails_refunded(api: Harness) -> None:
    credits = await api.credits()
    submitted = await v2(api, **{"X-Start-Timeout": "30"})
    assert submitted.status_code == 200, submitted.text
    request_id = submitted.json()["request_id"]
    assert await api.credits() < credits
    api.clock.advance(29)
    api.store.purge_expired(now=api.clock.now)  # the server's purge loop, run now
    assert (await api.status(request_id)).json()["status"] == "QUEUED"
    api.clock.advance(1)
    api.store.purge_expired(now=api.clock.now)
    status = (await api.status(request_id)).json()
    assert status["status"] == "FAILED", status
    assert "X-Start-Timeout" in str(status)
    assert await api.credits() == pytest.approx(credits), "refunded"


async def test_v1_answers_a_missed_start_deadline_and_a_started_job_is_not_cut(
    api: Harness,
) -> None:
    credits = await api.credits()
    waiting = asyncio.ensure_future(v1(api, **{"X-Start-Timeout": "5"}))
    while not sum(api.store.stats(now=api.clock.now).queued_by_model.values()):
        await asyncio.sleep(0.01)
    api.clock.advance(5)
    assert api.store.claim("w", slugs=None, lease_s=60, max_attempts=3, now=api.clock.now) == []
    answer: httpx.Response = await asyncio.wait_for(waiting, 10)
    assert answer.status_code == 503, answer.text
    assert "X-Start-Timeout" in answer.text
    assert await api.credits() == pytest.approx(credits)
    # A job a worker took in time runs to its end, however long.
    request_id = (await v2(api, **{"X-Start-Timeout": "5"})).json()["request_id"]
    job = api.claim()
    api.clock.advance(600)
    api.store.purge_expired(now=api.clock.now)
    api.complete(job.id)
    assert (await api.status(request_id)).json()["status"] == "COMPLETED"
