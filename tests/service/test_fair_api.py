"""What a client and an operator see of weighted fair queuing, in-process on SQLite and a real
redis-server: a job's queue position and ETA are its place in the fair order (a key that
submits behind a flood is shown near the front), /metrics has each key's queued and running
jobs and its GPU seconds (labelled by name, never the secret), the OpenAPI document declares
``X-Start-Timeout`` on every submit route, and the OpenAI route answers a missed start deadline
refunded (v1 and v2: ``test_backpressure.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from qwenserve.accounts.keys import create_api_key
from qwenserve.store.base import Store
from tests.service.helpers import body_for
from tests.service.inprocess import Harness, make_harness, open_test_store
from tests.service.test_metrics import samples, value

SLUG = "qwen-image-fast"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path):
        yield harness


async def submit(api: Harness, key: str, n: int) -> list[str]:
    ids = []
    for seed in range(n):
        answer = await api.http.post(
            f"/v2/{SLUG}", json=body_for(SLUG, seed=seed), headers=api.headers(key)
        )
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["request_id"])
    return ids


async def test_a_late_key_is_shown_near_the_front_with_a_shorter_eta(api: Harness) -> None:
    await submit(api, api.key, 1)
    measured = api.claim()
    api.clock.advance(4)
    api.complete(measured.id)  # one finished job: 4 s a job, a pace to estimate from
    flood = await submit(api, api.key, 20)
    late_key, late_id = api.new_key()
    late = await submit(api, late_key, 2)
    bodies = {i: (await api.status(i, late_key if i in late else None)).json() for i in late}
    flood_last = (await api.status(flood[-1])).json()
    positions = [bodies[i]["queue_position"] for i in late]
    # The owner was served one job already: the late key's first goes first, its second
    # level with the flood's first (key-id order on a tie), not behind the twenty.
    tie = 1 if api.key_id < late_id else 0
    assert positions == [0, 1 + tie], bodies
    assert flood_last["queue_position"] == 21
    assert all(b["eta_s"] is not None for b in bodies.values())
    assert bodies[late[0]]["eta_s"] < flood_last["eta_s"] / 5
    # The position shown is the claim's order: the next claim takes position 0.
    assert api.claim().id == late[0]


async def test_metrics_count_each_keys_jobs_and_gpu_seconds(api: Harness) -> None:
    other_key, other_record = create_api_key(
        api.store, name="team-b", credits_usd=10.0, rpm=0, now=api.clock.now
    )
    await submit(api, api.key, 3)
    await submit(api, other_key, 2)
    running = api.claim()
    page = samples((await api.http.get("/metrics")).text)
    owner = {"key": "owner", "key_id": api.key_id}
    team_b = {"key": "team-b", "key_id": other_record.id}
    ran_owner = running.key_id == api.key_id
    assert value(page, "qwenserve_key_jobs_queued", **owner) == 3 - ran_owner
    assert value(page, "qwenserve_key_jobs_queued", **team_b) == 2 - (not ran_owner)
    assert value(page, "qwenserve_key_jobs_running", **owner) == ran_owner
    assert value(page, "qwenserve_key_jobs_running", **team_b) == (not ran_owner)
    done = [running, *(api.claim() for _ in range(3))]
    for job in done:
        api.complete(job.id)  # the harness's result: 1.5 s of inference each
    text = (await api.http.get("/metrics")).text
    page = samples(text)
    owners = sum(job.key_id == api.key_id for job in done)
    assert 0 < owners < 4, "the fair order served both keys"
    assert value(page, "qwenserve_key_gpu_seconds_total", **owner) == pytest.approx(1.5 * owners)
    assert value(page, "qwenserve_key_gpu_seconds_total", **team_b) == pytest.approx(
        1.5 * (4 - owners)
    )
    # One job left queued, none running; a key with neither is absent.
    queued = {
        dict(ls)["key_id"]: v for (n, ls), v in page.items() if n == "qwenserve_key_jobs_queued"
    }
    running_now = [v for (n, _), v in page.items() if n == "qwenserve_key_jobs_running"]
    assert sum(queued.values()) == 1 and len(queued) == len(running_now) == 1
    assert running_now == [0.0]
    assert api.key not in text and other_key not in text, "never the secret"


async def test_the_openapi_document_declares_x_start_timeout(api: Harness) -> None:
    document = (await api.http.get("/openapi.json")).json()
    paths = document["paths"]
    routes = [f"/v2/{SLUG}", f"/v1/{SLUG}", "/v1/images/generations", "/v1/images/edits"]
    for path in routes:
        parameters = paths[path]["post"].get("parameters", [])
        [header] = [p for p in parameters if p["name"] == "X-Start-Timeout"]
        assert header["in"] == "header" and header["required"] is False, path
        assert header["schema"]["type"] == "number" and header["schema"]["exclusiveMinimum"] == 0
        assert "start_timeout" in header["description"], path
    # Polls and other routes do not take it.
    status = paths["/v2/requests/{request_id}/status"]["get"].get("parameters", [])
    assert "X-Start-Timeout" not in [p["name"] for p in status]
    # Every slug's submit routes carry it.
    slug_posts = [p for p in paths if p.startswith(("/v1/qwen", "/v2/qwen"))]
    assert slug_posts and all(
        any(q["name"] == "X-Start-Timeout" for q in paths[p]["post"].get("parameters", []))
        for p in slug_posts
    )


async def test_openai_route_answers_a_missed_start_deadline_refunded(api: Harness) -> None:
    credits = await api.credits()
    waiting = asyncio.ensure_future(
        api.http.post(
            "/v1/images/generations",
            json={"model": SLUG, "prompt": "a red fox"},
            headers={**api.headers(), "X-Start-Timeout": "5"},
        )
    )
    while not sum(api.store.stats(now=api.clock.now).queued_by_model.values()):
        await asyncio.sleep(0.01)
    assert await api.credits() < credits, "charged while it waits"
    api.clock.advance(5)
    assert api.store.claim("w", slugs=None, lease_s=60, max_attempts=3, now=api.clock.now) == []
    answer: httpx.Response = await asyncio.wait_for(waiting, 10)
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["type"] == "server_error" and "X-Start-Timeout" in error["message"]
    assert await api.credits() == pytest.approx(credits), "refunded"
