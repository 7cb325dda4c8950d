"""Following a job live: the SSE stream (order, end, resume), a v1 caller hanging up, and the
client's wait(on_progress); in-process on SQLite and on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwenserve.client import AlreadyEnded, AsyncQwenServeClient, StatusUpdate
from qwenserve.jobs import JobStatus
from qwenserve.store.base import Store
from tests.service.helpers import body_for
from tests.service.inprocess import Harness, make_harness, open_test_store, parse_sse

TRANSITIONS = {"queued", "processing", "cancel_requested", "completed", "failed"}


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path):
        yield harness


async def events(api: Harness, request_id: str, last_event_id: str | None = None) -> httpx.Response:
    headers = api.headers()
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return await api.http.get(f"/v2/requests/{request_id}/events", headers=headers)


async def run_job(api: Harness, request_id: str) -> None:
    """Play the worker: claim, report progress twice, complete; pausing so polls see each."""
    pause = 0.25  # many polls (every 0.02 s) per state, even on a loaded machine
    await asyncio.sleep(pause)
    api.claim()
    await asyncio.sleep(pause)
    for step in (2, 6):
        api.clock.advance(2)
        api.beat(request_id, step)
        await asyncio.sleep(pause)
    api.clock.advance(1)
    api.complete(request_id)


async def test_sse_sends_every_transition_in_order_and_ends(api: Harness) -> None:
    request_id = await api.submit()
    response, _ = await asyncio.gather(events(api, request_id), run_job(api, request_id))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = parse_sse(response.text)
    names = [e["event"] for e in stream]
    assert [n for n in names if n in TRANSITIONS] == ["queued", "processing", "completed"]
    assert names[-1] == "completed", "the terminal event ends the stream"
    assert all(e["id"] for e in stream if e["event"] in TRANSITIONS), "transitions carry ids"
    assert all(e["id"] is None for e in stream if e["event"] == "progress"), "progress has none"
    live = [e["data"] for e in stream if e["event"] == "progress"]
    assert live[0]["status"] == "QUEUED" and live[0]["queue_position"] == 0
    assert any(d.get("waiting") for d in live), "claimed before its first report: waiting"
    steps = [d["progress"]["step"] for d in live if "progress" in d]
    assert steps == [2, 6], "each report once (unchanged progress is not repeated)"
    end = stream[-1]["data"]
    assert end["status"] == "COMPLETED" and end["response_url"].endswith(request_id)

    # Resume from each transition's id: exactly the transitions after it, then the end.
    ids = {e["event"]: e["id"] for e in stream if e["event"] in TRANSITIONS}
    resumed = parse_sse((await events(api, request_id, ids["queued"])).text)
    assert [e["event"] for e in resumed] == ["processing", "completed"]
    assert [e["id"] for e in resumed] == [ids["processing"], ids["completed"]]
    resumed = parse_sse((await events(api, request_id, ids["processing"])).text)
    assert [e["event"] for e in resumed] == ["completed"]
    assert parse_sse((await events(api, request_id, ids["completed"])).text) == []
    # An ended job without Last-Event-ID: its whole history, then the stream closes.
    replay = parse_sse((await events(api, request_id)).text)
    assert [e["event"] for e in replay] == ["queued", "processing", "completed"]


async def test_sse_resume_mid_stream_loses_and_repeats_nothing(api: Harness) -> None:
    request_id = await api.submit()
    api.claim()
    # A client that read up to `processing` and dropped: the job then ends while it is away.
    history = api.store.job_events(request_id)
    assert [e.type.value for e in history] == ["queued", "processing"]
    cancel = await api.http.post(f"/v2/requests/{request_id}/cancel", headers=api.headers())
    assert cancel.status_code == 202
    api.fail_cancelled(request_id)
    resumed = parse_sse((await events(api, request_id, history[-1].id)).text)
    assert [e["event"] for e in resumed] == ["cancel_requested", "failed"]
    assert resumed[-1]["data"]["error"].startswith("cancelled")
    assert resumed[-1]["data"]["status"] == "FAILED"


async def test_sse_bad_last_event_id_is_400(api: Harness) -> None:
    request_id = await api.submit()
    response = await events(api, request_id, "not-an-id")
    assert response.status_code == 400
    assert "last-event-id" in response.json()["error"].lower() or "event id" in response.text


async def call_v1_and_hang_up(api: Harness, hang_up: asyncio.Event) -> list[dict[str, Any]]:
    """POST /v1 over raw ASGI, whose client disconnects once ``hang_up`` is set."""
    payload = json.dumps(body_for("qwen-image-fast")).encode()
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
        "path": "/v1/qwen-image-fast",
        "raw_path": b"/v1/qwen-image-fast",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"api.test"),
            (b"content-type", b"application/json"),
            (b"x-api-key", api.key.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("api.test", 80),
    }
    await api.app(scope, receive, send)  # type: ignore[arg-type]
    return sent


async def wait_queued(api: Harness) -> str:
    for _ in range(300):
        stats = api.store.stats(now=api.clock.now)
        if stats.queued_by_model:
            [(slug, _count)] = stats.queued_by_model.items()
            return api.claim(slug).id
        await asyncio.sleep(0.01)
    raise AssertionError("the v1 job never reached the queue")


@pytest.mark.parametrize("running", [False, True])
async def test_v1_caller_hanging_up_cancels_its_job(api: Harness, running: bool) -> None:
    before = await api.credits()
    hang_up = asyncio.Event()
    call = asyncio.create_task(call_v1_and_hang_up(api, hang_up))
    if running:
        job_id = await wait_queued(api)
    else:
        for _ in range(300):
            if api.store.stats(now=api.clock.now).queued_by_model:
                break
            await asyncio.sleep(0.01)
    hang_up.set()
    sent = await asyncio.wait_for(call, 10)
    headers = dict(sent[0]["headers"])
    request_id = headers[b"x-request-id"].decode()
    job = api.store.get_job(request_id, now=api.clock.now)
    assert job is not None
    if running:
        assert job_id == request_id
        assert job.status is JobStatus.PROCESSING and job.cancel_requested_at is not None
        assert request_id in api.beat(request_id, 1).cancelled
        api.fail_cancelled(request_id)
    else:
        assert job.status is JobStatus.FAILED and job.error_kind == "cancelled"
    assert await api.credits() == pytest.approx(before), "refunded"


async def test_v1_hang_up_with_cancel_on_disconnect_off_keeps_the_job(
    store: Store, tmp_path: Path
) -> None:
    async for api in make_harness(store, tmp_path, cancel_on_disconnect=False):
        hang_up = asyncio.Event()
        call = asyncio.create_task(call_v1_and_hang_up(api, hang_up))
        job_id = await wait_queued(api)
        hang_up.set()
        await asyncio.sleep(0.2)
        assert not call.done(), "still waiting: it does not watch its caller"
        api.complete(job_id)
        sent = await asyncio.wait_for(call, 10)
        assert sent[0]["status"] == 200


async def test_client_wait_reports_advancing_progress(api: Harness) -> None:
    updates: list[StatusUpdate] = []
    transport = httpx.ASGITransport(app=api.app)
    async with AsyncQwenServeClient(
        api_key=api.key, base_url="http://api.test/v1", transport=transport
    ) as client:
        job = await client.submit_async("qwen-image-fast", **body_for("qwen-image-fast"))
        result, _ = await asyncio.gather(
            job.wait(timeout=30, interval=0.02, on_progress=updates.append),
            run_job(api, job.request_id),
        )
    assert result["status"] == "COMPLETED"
    assert updates[0].status == "QUEUED" and updates[0].queue_position == 0
    assert any(u.waiting for u in updates)
    fractions = [u.fraction for u in updates if u.fraction is not None]
    assert fractions == sorted(fractions) and {0.25, 0.75} <= set(fractions)
    assert any(u.eta_s is not None for u in updates if u.step is not None)
    assert updates[-1].status == "COMPLETED"


async def test_client_cancel(api: Harness) -> None:
    transport = httpx.ASGITransport(app=api.app)
    async with AsyncQwenServeClient(
        api_key=api.key, base_url="http://api.test", transport=transport
    ) as client:
        job = await client.submit_async("qwen-image-fast", **body_for("qwen-image-fast"))
        body = await job.cancel()
        assert body["status"] == "FAILED"
        with pytest.raises(AlreadyEnded) as ended:
            await job.cancel()
        assert ended.value.job_status == "FAILED" and ended.value.status == 409
