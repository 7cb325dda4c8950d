"""Watching and stopping a job over v2, in-process on SQLite and on a real redis-server: queue
positions, progress and ETAs in the status, cancel (queued, running, finished), ownership."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qwenserve.media.inline import stored_input_ids
from qwenserve.store.base import Store
from tests.service.helpers import body_for, png_b64
from tests.service.inprocess import Harness, make_harness, open_test_store


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path):
        yield harness


async def test_queue_positions_per_model(api: Harness) -> None:
    fast = [await api.submit("qwen-image-fast", seed=i) for i in range(3)]
    slow = [await api.submit("qwen-image", seed=i) for i in range(2)]
    for ids in (fast, slow):
        bodies = [(await api.status(i)).json() for i in ids]
        assert [b["queue_position"] for b in bodies] == list(range(len(ids)))
        assert all(b["status"] == "QUEUED" and b["eta_s"] is None for b in bodies), bodies
        assert all("progress" not in b and "waiting" not in b for b in bodies)

    claimed = api.claim("qwen-image-fast")
    assert claimed.id == fast[0]
    running = (await api.status(fast[0])).json()
    assert running["status"] == "PROCESSING"
    assert running["waiting"] is True, "claimed, no progress yet: waiting, not denoising"
    assert "progress" not in running and running["eta_s"] is None
    assert "queue_position" not in running
    assert [(await api.status(i)).json()["queue_position"] for i in fast[1:]] == [0, 1]
    assert [(await api.status(i)).json()["queue_position"] for i in slow] == [0, 1]
    # The result endpoint carries the same live fields while the job is unfinished.
    result = await api.http.get(f"/v2/requests/{fast[1]}", headers=api.headers())
    assert result.json()["queue_position"] == 0 and result.json()["output"] is None


async def test_progress_and_etas_from_measured_pace(api: Harness) -> None:
    first = await api.submit()
    second = await api.submit(seed=2)
    api.claim()
    api.clock.advance(4)
    api.beat(first, 2)  # 2 of 8 steps 4 s after the claim: 2 s a step, measured from the start
    body = (await api.status(first)).json()
    assert body["progress"] == {"step": 2, "total_steps": 8, "fraction": 0.25}
    assert body["eta_s"] == pytest.approx(12.0)
    assert "waiting" not in body

    api.clock.advance(4)
    api.beat(first, 6)  # 4 steps in 4 s: the steps' own pace, 1 s a step
    body = (await api.status(first)).json()
    assert body["progress"]["step"] == 6 and body["progress"]["fraction"] == 0.75
    assert body["eta_s"] == pytest.approx(2.0)
    api.clock.advance(1)  # a second after the report, a second less to go
    assert (await api.status(first)).json()["eta_s"] == pytest.approx(1.0)

    queued = (await api.status(second)).json()
    assert queued["queue_position"] == 0 and queued["eta_s"] is None, "nothing finished yet"
    api.clock.advance(1)
    api.complete(first)  # ran 10 s: the model's pace is now 10 s a job
    api.clock.advance(2)  # past the throughput refresh
    queued = (await api.status(second)).json()
    assert queued["eta_s"] == pytest.approx(10.0)
    done = await api.status(first)
    assert done.status_code == 200
    assert not {"progress", "eta_s", "waiting", "queue_position"} & set(done.json())


async def test_cancel_queued_ends_refunds_and_deletes_inputs(api: Harness) -> None:
    slug = "qwen-image-edit-fast"
    before = await api.credits()
    request_id = await api.submit(slug, image=png_b64())
    job = api.store.get_job(request_id, now=api.clock.now)
    assert job is not None
    inputs = stored_input_ids(job.request)
    assert inputs and api.media.get(inputs[0], now=api.clock.now) is not None
    assert await api.credits() < before

    response = await api.http.post(f"/v2/requests/{request_id}/cancel", headers=api.headers())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "FAILED" and body["error"].startswith("cancelled")
    assert await api.credits() == pytest.approx(before), "refunded"
    assert all(api.media.get(i, now=api.clock.now) is None for i in inputs), "inputs deleted"
    status = await api.status(request_id)
    assert status.status_code == 422 and status.json()["error"].startswith("cancelled")
    result = await api.http.get(f"/v2/requests/{request_id}", headers=api.headers())
    assert result.status_code == 422 and result.json()["output"] is None
    again = await api.http.post(f"/v2/requests/{request_id}/cancel", headers=api.headers())
    assert again.status_code == 409
    assert again.json()["status"] == "FAILED" and "already ended" in again.json()["error"]


async def test_cancel_running_asks_the_worker(api: Harness) -> None:
    before = await api.credits()
    request_id = await api.submit()
    api.claim()
    api.beat(request_id, 3)
    response = await api.http.delete(f"/v2/requests/{request_id}", headers=api.headers())
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "PROCESSING" and body["cancel_requested"] is True
    assert body["progress"]["step"] == 3
    assert (await api.status(request_id)).json()["cancel_requested"] is True

    heartbeat = api.beat(request_id, 4)
    assert request_id in heartbeat.cancelled, "the worker learns it at its next heartbeat"
    api.fail_cancelled(request_id)
    status = await api.status(request_id)
    assert status.status_code == 422 and status.json()["status"] == "FAILED"
    assert "cancel_requested" not in status.json()
    assert await api.credits() == pytest.approx(before)


async def test_cancel_after_the_end_is_409_with_its_status(api: Harness) -> None:
    request_id = await api.submit()
    api.claim()
    api.complete(request_id)
    response = await api.http.post(f"/v2/requests/{request_id}/cancel", headers=api.headers())
    assert response.status_code == 409
    assert response.json() == {"error": response.json()["error"], "status": "COMPLETED"}
    assert (await api.status(request_id)).json()["status"] == "COMPLETED"


async def test_other_keys_and_unknown_ids_are_404(api: Harness) -> None:
    request_id = await api.submit()
    other, _ = api.new_key()
    for method, path in (
        ("POST", f"/v2/requests/{request_id}/cancel"),
        ("DELETE", f"/v2/requests/{request_id}"),
        ("GET", f"/v2/requests/{request_id}/events"),
        ("GET", f"/v2/requests/{request_id}/status"),
    ):
        response = await api.http.request(method, path, headers=api.headers(other))
        assert response.status_code == 404, (method, path, response.text)
        assert "error" in response.json()
    unknown = await api.http.post("/v2/requests/nope/cancel", headers=api.headers())
    assert unknown.status_code == 404
    assert (await api.status(request_id)).json()["status"] == "QUEUED", "still there"


async def test_v1_waiter_of_a_job_cancelled_through_v2_gets_409(api: Harness) -> None:
    before = await api.credits()
    waiter = asyncio.create_task(
        api.http.post(
            "/v1/qwen-image-fast", json=body_for("qwen-image-fast"), headers=api.headers()
        )
    )
    for _ in range(200):
        if api.store.stats(now=api.clock.now).queued_by_model:
            break
        await asyncio.sleep(0.01)
    job = api.claim()
    cancel = await api.http.post(f"/v2/requests/{job.id}/cancel", headers=api.headers())
    assert cancel.status_code == 202
    assert job.id in api.beat(job.id, 1).cancelled
    api.fail_cancelled(job.id)
    response = await asyncio.wait_for(waiter, 10)
    assert response.status_code == 409
    assert response.json()["status"] == "FAILED" and "cancel" in response.json()["error"]
    assert float(response.headers["x-remaining-credits"]) == pytest.approx(before)


async def test_healthz_and_metrics_count_a_waiting_job_as_queued(api: Harness) -> None:
    request_id = await api.submit()

    async def figures() -> tuple[int, int, float, float]:
        health = (await api.http.get("/healthz")).json()
        metrics = (await api.http.get("/metrics")).text

        def gauge(name: str) -> float:  # a model with nothing to count has no series
            lines = [line for line in metrics.splitlines() if line.startswith(name + "{")]
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

        return (
            health["queued"],
            health["processing"],
            gauge("qwenserve_queue_depth"),
            gauge("qwenserve_jobs_processing"),
        )

    assert await figures() == (1, 0, 1.0, 0.0)
    api.claim()  # claimed ahead, no progress yet: still waiting for the engine
    assert await figures() == (1, 0, 1.0, 0.0)
    api.beat(request_id, 1)  # denoising now
    assert await figures() == (0, 1, 0.0, 1.0)


async def test_a_restarted_api_node_shows_etas_learnt_from_the_retained_log(
    api: Harness, store: Store, tmp_path: Path
) -> None:
    first = await api.submit()
    second = await api.submit(seed=2)
    api.claim()
    api.clock.advance(10)
    api.complete(first)  # ran 10 s
    api.claim()
    api.clock.advance(6)
    api.complete(second)  # ran 6 s, 6 s after the previous completion
    api.services.close()
    # A new node over the same store: no job finishes after it starts, yet it knows the pace.
    async for restarted in make_harness(store, tmp_path / "restarted"):
        try:
            restarted.clock.advance(api.clock.now - restarted.clock.now + 5)
            queued = await restarted.submit(seed=3)
            body = (await restarted.status(queued)).json()
            assert body["queue_position"] == 0
            assert body["eta_s"] == pytest.approx(8.0), body  # (10 + 6) / 2 s a job, one job
        finally:
            restarted.services.close()
