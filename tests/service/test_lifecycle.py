"""Expiry, isolation, concurrency and durability of a real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from segmind import SegmindClient

from qwenserve.client import AsyncQwenServeClient, InferenceFailed, QwenServeClient
from tests.processes import Server
from tests.service.helpers import body_for, open_image


def status_of(server: Server, key: str, request_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v2/requests/{request_id}/status", headers={"x-api-key": key})


def credits_of(server: Server, key: str) -> float:
    response = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": key})
    return float(response.json()["credits"])


def wait_all_terminal(server: Server, key: str, ids: list[str], timeout_s: float) -> dict[str, str]:
    deadline = time.time() + timeout_s
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = {i: status_of(server, key, i).json()["status"] for i in ids}
        if all(s in ("COMPLETED", "FAILED") for s in states.values()):
            return states
        time.sleep(0.25)
    return states


def test_api_does_not_import_torch() -> None:
    code = (
        "import sys, qwenserve.api.app, qwenserve.cli.serve, qwenserve.cli.remote;"
        "import qwenserve.client;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_results_and_media_expire(make_server: object) -> None:
    ttl_s = 12.0  # room for the first job to load its pipeline on a busy machine
    server: Server = make_server("--result-ttl", str(ttl_s))  # type: ignore[operator]
    server.start()
    key = server.create_key(credits=5.0)
    client = SegmindClient(api_key=key, base_url=f"{server.url}/v1")
    submitted_at = time.time()
    result = client.run("qwen-image-fast", **body_for("qwen-image-fast"))
    request_id = result["request_id"]
    assert httpx.get(result["output"]).status_code == 200
    assert status_of(server, key, request_id).status_code == 200
    time.sleep(max(0.0, submitted_at + ttl_s + 0.5 - time.time()))
    gone = status_of(server, key, request_id)
    assert gone.status_code == 404 and "error" in gone.json()
    assert (
        httpx.get(f"{server.url}/v2/requests/{request_id}", headers={"x-api-key": key}).status_code
        == 404
    )
    assert httpx.get(result["output"]).status_code == 404


def test_key_isolation(server: Server) -> None:
    alice = server.create_key(credits=5.0)
    bob = server.create_key(credits=5.0)
    job = SegmindClient(api_key=alice, base_url=f"{server.url}/v1").submit_async(
        "qwen-image-fast", **body_for("qwen-image-fast")
    )
    assert status_of(server, bob, job.request_id).status_code == 404
    assert httpx.get(job.response_url, headers={"x-api-key": bob}).status_code == 404
    assert job.wait(timeout=60, interval=0.1)["status"] == "COMPLETED"


def test_many_concurrent_jobs_none_lost(server: Server) -> None:
    key = server.create_key(credits=10.0)
    client = SegmindClient(api_key=key, base_url=f"{server.url}/v1", timeout=120)

    def one(index: int) -> tuple[int, bytes | str]:
        if index % 2:
            response = client.run_sync("qwen-image-fast", **body_for("qwen-image-fast", seed=index))
            return index, response.content
        result = client.submit_async(
            "qwen-image-fast", **body_for("qwen-image-fast", seed=index)
        ).wait(timeout=120, interval=0.1)
        return index, str(result["status"])

    with ThreadPoolExecutor(max_workers=14) as pool:
        outcomes = dict(pool.map(one, range(14)))
    assert len(outcomes) == 14
    for index, outcome in outcomes.items():
        if index % 2:
            assert isinstance(outcome, bytes) and open_image(outcome).format == "PNG"
        else:
            assert outcome == "COMPLETED"
    assert credits_of(server, key) == pytest.approx(10.0 - 14 * 0.02)


def test_kill_minus_nine_loses_nothing(make_server: object) -> None:
    server: Server = make_server()  # type: ignore[operator]
    server.start()
    key = server.create_key(credits=10.0)
    ids = []
    for index in range(8):
        response = httpx.post(
            f"{server.url}/v2/qwen-image",
            headers={"x-api-key": key},
            json=body_for("qwen-image", steps=3, seed=index),
        )
        assert response.status_code == 200
        ids.append(response.json()["request_id"])
    # Let the worker get into the queue, then kill the server with no chance to clean up.
    deadline = time.time() + 60
    while time.time() < deadline:
        states = [status_of(server, key, i).json()["status"] for i in ids]
        if "PROCESSING" in states or "COMPLETED" in states:
            break
        time.sleep(0.05)
    server.kill()

    server.start()  # same data dir, same port
    states = wait_all_terminal(server, key, ids, timeout_s=120)
    assert set(states.values()) == {"COMPLETED"}, states
    assert credits_of(server, key) == pytest.approx(10.0 - 8 * 0.121)
    # Every image is served, exactly one per request, and the seed was kept across the crash.
    for index, request_id in enumerate(ids):
        body = httpx.get(
            f"{server.url}/v2/requests/{request_id}", headers={"x-api-key": key}
        ).json()
        assert body["seed"] == index
        assert httpx.get(body["output"]).status_code == 200


def test_sigterm_drains_and_restart_finishes_queue(make_server: object) -> None:
    server: Server = make_server()  # type: ignore[operator]
    server.start()
    key = server.create_key(credits=10.0)
    ids = [
        httpx.post(
            f"{server.url}/v2/qwen-image-fast",
            headers={"x-api-key": key},
            json=body_for("qwen-image-fast", seed=i),
        ).json()["request_id"]
        for i in range(6)
    ]
    assert server.terminate(timeout_s=60) == 0
    server.start()
    states = wait_all_terminal(server, key, ids, timeout_s=120)
    assert set(states.values()) == {"COMPLETED"}, states


def test_qwenserve_client_sync_and_async(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    key = server.create_key(credits=5.0)
    monkeypatch.setenv("QWENSERVE_API_KEY", key)
    with QwenServeClient(base_url=f"{server.url}/v1") as client:
        result = client.run("qwen-image-fast", **body_for("qwen-image-fast"))
        assert result["status"] == "COMPLETED"
        image = client.run_sync(
            "qwen-image-fast", **body_for("qwen-image-fast", image_format="webp")
        )
        assert open_image(image.content).format == "WEBP"
        job = client.submit_async(
            "qwen-image-edit-fast",
            **body_for("qwen-image-edit-fast", image="https://127.0.0.1:1/x.png"),
        )
        with pytest.raises(InferenceFailed):
            job.wait(timeout=60, interval=0.1)
        assert client.credits() == pytest.approx(5.0 - 2 * 0.02)

    async def go() -> dict[str, object]:
        async with AsyncQwenServeClient(base_url=f"{server.url}/v1") as aclient:
            jobs = [
                await aclient.submit_async("qwen-image-fast", **body_for("qwen-image-fast", seed=s))
                for s in range(3)
            ]
            results = await asyncio.gather(*(j.wait(timeout=60, interval=0.1) for j in jobs))
            return {"seeds": [r["seed"] for r in results]}

    assert asyncio.run(go()) == {"seeds": [0, 1, 2]}


def test_metrics_and_healthz(server: Server) -> None:
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and health["workers"] == 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "qwenserve_queue_depth" in metrics and "qwenserve_oldest_queued_age_seconds" in metrics
    assert httpx.get(f"{server.url}/openapi.json").json()["info"]["title"] == "qwenserve"
