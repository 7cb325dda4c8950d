"""/metrics after real traffic: the API in-process over ASGI, a real worker runner with the
tiny-preset engine on a real SQLite store, its figures reaching /metrics through its registry
announcement (the path a worker in another process takes too); and v1's Server-Timing."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwenserve.accounts.keys import create_api_key
from qwenserve.api.app import create_app
from qwenserve.api.services import Services
from qwenserve.config import Settings
from qwenserve.media.storage import LocalMediaStore
from qwenserve.notify import CompletionHub
from qwenserve.store.sqlite import SqliteStore
from qwenserve.store.workers import SqliteWorkerRegistry
from qwenserve.worker.config import WorkerConfig
from qwenserve.worker.inputs import MediaInputLoader
from qwenserve.worker.runner import WorkerRunner
from tests.service.helpers import body_for

SLUG = "qwen-image-fast"
WORKER = "w-metrics"


@dataclass
class Live:
    http: httpx.AsyncClient
    runner: WorkerRunner
    headers: dict[str, str]
    thread: threading.Thread

    def start_worker(self) -> None:
        self.thread.start()


@pytest.fixture
async def live(tmp_path: Path, shared_cache: Path) -> AsyncIterator[Live]:
    from qwenserve.runtime import Engine, EngineConfig

    settings = Settings(data_dir=tmp_path, cache_dir=shared_cache, wait_poll_s=0.05)
    store = SqliteStore(tmp_path / "qwenserve.db")
    registry = SqliteWorkerRegistry(tmp_path / "workers.db")
    media = LocalMediaStore(tmp_path / "media")
    hub = CompletionHub(fallback_poll_s=0.05)
    runner = WorkerRunner(
        store=store,
        media=media,
        engine=Engine(EngineConfig(weights="tiny", cache_dir=shared_cache, resident_models=1)),
        inputs=MediaInputLoader.from_settings(settings, media).for_worker(),
        config=WorkerConfig(worker_id=WORKER, max_batch=4, poll_interval_s=0.01),
        on_job_done=hub.notify,
        registry=registry,
    )
    services = Services(
        settings=settings,
        store=store,
        media=media,
        hub=hub,
        registry=registry,
        on_submitted=lambda _id: runner.wake(),
    )
    key, _ = create_api_key(store, name="m", credits_usd=10.0, rpm=0, now=services.clock())
    thread = threading.Thread(target=runner.run_forever, daemon=True)
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
        yield Live(http, runner, {"x-api-key": key}, thread)
    runner.stop()
    if thread.is_alive():
        thread.join(30)
    store.close()


Page = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Page:
    """Every sample of a /metrics page: (name, labels) → value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(page: Page, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in page.items() if n == name and wanted <= ls]
    assert found, f"no {name} with {labels}"
    return sum(found)


async def wait_completed(live: Live, request_id: str) -> None:
    for _ in range(600):
        status = await live.http.get(f"/v2/requests/{request_id}/status", headers=live.headers)
        if status.json()["status"] == "COMPLETED":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{request_id} did not complete")


async def test_metrics_after_traffic_count_the_jobs_run(live: Live) -> None:
    # A job cancelled while queued (the worker is not started yet): a failure of kind cancelled.
    queued = await live.http.post(f"/v2/{SLUG}", json=body_for(SLUG), headers=live.headers)
    cancelled_id = queued.json()["request_id"]
    cancel = await live.http.post(f"/v2/requests/{cancelled_id}/cancel", headers=live.headers)
    assert cancel.status_code == 200, cancel.text
    live.start_worker()
    for seed in (1, 2):
        response = await live.http.post(
            f"/v1/{SLUG}", json=body_for(SLUG, seed=seed), headers=live.headers
        )
        assert response.status_code == 200, response.text
    body = body_for(SLUG, seed=3)
    submitted = await live.http.post(f"/v2/{SLUG}", json=body, headers=live.headers)
    await wait_completed(live, submitted.json()["request_id"])
    await asyncio.to_thread(live.runner.announce)  # the presence thread would, within seconds

    text = (await live.http.get("/metrics")).text
    page = samples(text)
    worker = {"worker": WORKER, "model": SLUG}
    assert value(page, "qwenserve_job_queue_wait_seconds_count", **worker) == 3
    assert value(page, "qwenserve_job_inference_seconds_count", **worker) == 3
    assert value(page, "qwenserve_job_inference_seconds_sum", **worker) > 0
    assert value(page, "qwenserve_batch_size_sum", **worker) == 3  # every job ran in some call
    calls = value(page, "qwenserve_batch_size_count", **worker)
    assert 1 <= calls <= 3
    assert value(page, "qwenserve_denoising_step_seconds_count", **worker) >= calls
    assert value(page, "qwenserve_pipeline_loads_total", worker=WORKER) == 1
    assert value(page, "qwenserve_lora_cache_hits_total", worker=WORKER) == 0
    assert value(page, "qwenserve_lora_cache_misses_total", worker=WORKER) == 0
    assert value(page, "qwenserve_worker_memory_bytes", worker=WORKER, kind="rss") > 10e6
    assert value(page, "process_resident_memory_bytes") > 10e6
    assert value(page, "qwenserve_jobs_completed_total", model=SLUG) == 3
    assert value(page, "qwenserve_job_failures_total", model=SLUG, kind="cancelled") == 1
    # HTTP by route template and status, never by raw id.
    http = "qwenserve_http_requests_total"
    # One route per slug (api/docs.py): the handler label is its path, bounded by the catalog.
    assert value(page, http, handler=f"/v1/{SLUG}", method="POST", status="200") == 2
    assert value(page, http, handler=f"/v2/{SLUG}", method="POST", status="200") == 2
    assert value(page, http, handler="/v2/requests/{request_id}/cancel", status="200") == 1
    assert value(page, http, handler="/v2/requests/{request_id}/status", status="200") >= 1
    latency = "qwenserve_http_request_duration_seconds_count"
    assert value(page, latency, handler=f"/v1/{SLUG}", method="POST", status="200") == 2
    handlers = {dict(labels).get("handler") for (name, labels) in page if name == http}
    assert not any(cancelled_id in (h or "") for h in handlers)


async def test_v1_answers_server_timing_and_the_seed(live: Live) -> None:
    live.start_worker()
    body = body_for(SLUG, seed=77)
    response = await live.http.post(f"/v1/{SLUG}", json=body, headers=live.headers)
    assert response.status_code == 200, response.text
    timing = dict(
        (name, float(ms))
        for name, ms in re.findall(r"(\w+);dur=([0-9.]+)", response.headers["Server-Timing"])
    )
    assert set(timing) == {"queue", "inference", "encode"}
    generation_s = float(response.headers["x-generation-time"])
    assert timing["inference"] == pytest.approx(generation_s * 1000, abs=0.2)
    assert timing["encode"] > 0 and timing["queue"] >= 0
    assert json.loads(response.headers["x-output-metadata"])["seed"] == 77
