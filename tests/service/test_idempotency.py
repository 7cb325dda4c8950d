"""Idempotency-Key on POST /v1 and /v2, in-process on SQLite and on a real redis-server: a retry
answers the first request (no second job, no second charge), another body is a 409, and a v1
caller that hangs up leaves its job for the retry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qwenserve.jobs import JobStatus
from qwenserve.store.base import Store
from tests.service.helpers import body_for
from tests.service.inprocess import Harness, make_harness, open_test_store

SLUG = "qwen-image-fast"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path):
        yield harness


def idem(api: Harness, value: str, key: str | None = None) -> dict[str, str]:
    return {**api.headers(key), "Idempotency-Key": value}


async def queued(api: Harness) -> int:
    return sum(api.store.stats(now=api.clock.now).queued_by_model.values())


async def test_v2_retry_answers_the_same_request_and_charges_once(api: Harness) -> None:
    before = await api.credits()
    body = body_for(SLUG, prompt="a lighthouse")  # no seed: the server draws one, once
    first = await api.http.post(f"/v2/{SLUG}", json=body, headers=idem(api, "order-1"))
    assert first.status_code == 200, first.text
    after_first = await api.credits()
    assert after_first < before
    again = await api.http.post(f"/v2/{SLUG}", json=body, headers=idem(api, "order-1"))
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert again.headers["X-Request-ID"] == first.json()["request_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await api.credits() == pytest.approx(after_first), "no second charge"
    assert await queued(api) == 1


async def test_same_body_spelled_differently_is_the_same_request(api: Harness) -> None:
    body = body_for(SLUG, seed=5)
    first = await api.http.post(f"/v2/{SLUG}", json=body, headers=idem(api, "k"))
    reordered = dict(reversed(list(body.items())))
    again = await api.http.post(
        f"/v2/{SLUG}", content=json.dumps(reordered, indent=2), headers=idem(api, "k")
    )
    assert again.json()["request_id"] == first.json()["request_id"]


async def test_reused_key_with_another_body_is_409_naming_the_header(api: Harness) -> None:
    first = await api.http.post(f"/v2/{SLUG}", json=body_for(SLUG, seed=1), headers=idem(api, "k"))
    before = await api.credits()
    other = await api.http.post(f"/v2/{SLUG}", json=body_for(SLUG, seed=2), headers=idem(api, "k"))
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["error"]
    assert first.json()["request_id"] in other.json()["error"]
    v1 = await api.http.post(f"/v1/{SLUG}", json=body_for(SLUG, seed=3), headers=idem(api, "k"))
    assert v1.status_code == 409
    assert await api.credits() == pytest.approx(before)
    assert await queued(api) == 1


@pytest.mark.parametrize("value", ["", "x" * 256, "tab\there", "caf\u00e9"])
async def test_a_bad_header_is_400_naming_it(api: Harness, value: str) -> None:
    headers: dict[str, Any] = {**api.headers(), "Idempotency-Key": value.encode("utf-8")}
    response = await api.http.post(f"/v2/{SLUG}", json=body_for(SLUG), headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == "Idempotency-Key"
    assert await queued(api) == 0


async def test_longest_and_punctuated_keys_are_accepted(api: Harness) -> None:
    for value in ("x" * 255, "a b:c/d~!"):
        response = await api.http.post(f"/v2/{SLUG}", json=body_for(SLUG), headers=idem(api, value))
        assert response.status_code == 200, response.text


async def test_different_api_keys_are_independent(api: Harness) -> None:
    other_key, _ = api.new_key()
    body = body_for(SLUG, seed=1)
    mine = await api.http.post(f"/v2/{SLUG}", json=body, headers=idem(api, "shared"))
    theirs = await api.http.post(
        f"/v2/{SLUG}", json=body_for(SLUG, seed=9), headers=idem(api, "shared", other_key)
    )
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["request_id"] != mine.json()["request_id"]
    assert await queued(api) == 2


async def test_fifty_concurrent_duplicates_make_one_job_and_one_charge(api: Harness) -> None:
    before = await api.credits()
    body = body_for(SLUG, prompt="a storm")
    responses = await asyncio.gather(
        *(api.http.post(f"/v2/{SLUG}", json=body, headers=idem(api, "burst")) for _ in range(50))
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["request_id"] for r in responses}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in responses) == 1
    assert await queued(api) == 1
    job = api.store.get_job(responses[0].json()["request_id"], now=api.clock.now)
    assert job is not None
    assert await api.credits() == pytest.approx(before - job.cost_usd)


async def test_v1_retry_returns_the_same_image(api: Harness) -> None:
    body = body_for(SLUG)
    call = asyncio.create_task(api.http.post(f"/v1/{SLUG}", json=body, headers=idem(api, "sync-1")))
    job_id = await claim_when_queued(api)
    api.complete(job_id)
    first = await asyncio.wait_for(call, 10)
    assert first.status_code == 200, first.text
    before = await api.credits()
    again = await api.http.post(f"/v1/{SLUG}", json=body, headers=idem(api, "sync-1"))
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["X-Request-ID"] == job_id == first.headers["X-Request-ID"]
    assert await api.credits() == pytest.approx(before)


async def test_v1_caller_hanging_up_leaves_the_job_for_its_retry(api: Harness) -> None:
    hang_up = asyncio.Event()
    call = asyncio.create_task(call_v1_and_hang_up(api, hang_up, "sync-2"))
    job_id = await claim_when_queued(api)
    hang_up.set()
    await asyncio.sleep(0.1)
    job = api.store.get_job(job_id, now=api.clock.now)
    assert job is not None and job.cancel_requested_at is None, "not cancelled: a retry may come"
    retry = asyncio.create_task(
        api.http.post(f"/v1/{SLUG}", json=body_for(SLUG), headers=idem(api, "sync-2"))
    )
    await asyncio.sleep(0.1)
    assert not retry.done(), "the retry waits for the same job"
    api.complete(job_id)
    response = await asyncio.wait_for(retry, 10)
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == job_id
    assert response.content == b"\x89PNG fake"
    call.cancel()
    job = api.store.get_job(job_id, now=api.clock.now)
    assert job is not None and job.status is JobStatus.COMPLETED


async def claim_when_queued(api: Harness) -> str:
    for _ in range(300):
        if await queued(api):
            return api.claim().id
        await asyncio.sleep(0.01)
    raise AssertionError("the v1 job never reached the queue")


async def call_v1_and_hang_up(
    api: Harness, hang_up: asyncio.Event, idempotency_key: str
) -> list[dict[str, Any]]:
    """POST /v1 with an Idempotency-Key over raw ASGI; the client disconnects on ``hang_up``."""
    payload = json.dumps(body_for(SLUG)).encode()
    delivered = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"/v1/{SLUG}",
        "raw_path": f"/v1/{SLUG}".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"api.test"),
            (b"content-type", b"application/json"),
            (b"x-api-key", api.key.encode()),
            (b"idempotency-key", idempotency_key.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("api.test", 80),
    }
    await api.app(scope, receive, send)  # type: ignore[arg-type]
    return sent
