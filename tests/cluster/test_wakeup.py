"""Idle workers in other processes take a job as soon as it is submitted on any API node (Redis
pub/sub), not at their next poll: every worker here polls only every 30 s. And an API node
answers a POST /v1 as soon as a worker process ends the job (the done channel), not at its next
re-read of the store: the API node here re-reads only every 30 s."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from qwenserve.accounts.keys import create_api_key
from qwenserve.store.redis import RedisStore
from tests.processes import Server, WorkerProcess
from tests.redis_server import RedisServer, needs_redis
from tests.service.helpers import body_for

pytestmark = [
    pytest.mark.redis,
    needs_redis,
]

SLOW_POLL = {"QWENSERVE_POLL_INTERVAL_S": "30", "QWENSERVE_LOG_LEVEL": "INFO"}
# A job taken (PROCESSING) within this was woken for: far below the 30 s poll, far above any
# wake-up latency. Waiting for COMPLETED would add the tiny pipeline's first run (~5 s) and
# prove nothing more: completion is the other cluster tests' subject.
WOKEN_WITHIN_S = 10.0
START_TIMEOUT_S = 60.0
SLOW_WAIT_POLL = {"QWENSERVE_WAIT_POLL_S": "30"}


@dataclass
class Deployment:
    """An API node with no worker (its v1 waiters re-read the store every 30 s), a ``qwenserve
    worker`` serving qwen-image-fast only, and a ``qwenserve serve`` node with one in-process
    worker (every model), both polling every 30 s."""

    store: RedisStore
    api: Server
    worker: WorkerProcess
    serve_node: Server
    key: str

    def submit(self, slug: str) -> str:
        response = httpx.post(
            f"{self.api.url}/v2/{slug}", headers={"x-api-key": self.key}, json=body_for(slug)
        )
        assert response.status_code == 200, response.text
        return str(response.json()["request_id"])

    def status(self, request_id: str) -> str:
        response = httpx.get(
            f"{self.api.url}/v2/requests/{request_id}/status", headers={"x-api-key": self.key}
        )
        return str(response.json()["status"])

    def wait_until(
        self, request_id: str, statuses: set[str], within_s: float = WOKEN_WITHIN_S
    ) -> str:
        """Wait (at most ``within_s``) until the job is in one of ``statuses``."""
        deadline = time.monotonic() + within_s
        while (status := self.status(request_id)) not in statuses:
            assert time.monotonic() < deadline, f"{request_id} still {status}"
            time.sleep(0.05)
        return status

    def ran_by(self, request_id: str) -> str:
        job = self.store.get_job(request_id, now=time.time())
        assert job is not None and job.worker_id is not None
        return str(job.worker_id)


def _wait_for_log(process: WorkerProcess, text: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while text not in process.logs():
        assert process.process is not None and process.process.poll() is None, process.logs()
        assert time.monotonic() < deadline, f"no {text!r} in:\n{process.logs()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("wakeup")
    redis = RedisServer(dir=tmp / "redis").start()
    store = RedisStore.from_url(redis.url)
    with_redis = {"QWENSERVE_STORE": redis.url}
    api = Server(
        tmp / "api",
        shared_cache,
        extra_env={**SLOW_WAIT_POLL, **with_redis},
        args=["--workers", "0"],
    )
    serve_node = Server(
        tmp / "serve", shared_cache, extra_env={**SLOW_POLL, **with_redis}, args=["--workers", "1"]
    )
    worker = WorkerProcess(
        redis.url, tmp / "worker", shared_cache, args=["--models", "qwen-image-fast"]
    )
    worker.extra_env = SLOW_POLL
    try:
        # Started side by side: process start-up is most of this module's time.
        api.start(wait=False)
        serve_node.start(wait=False)
        worker.start()
        key, _ = create_api_key(store, name="wakeup", credits_usd=10.0, rpm=0, now=time.time())
        api.wait_healthy(START_TIMEOUT_S)
        serve_node.wait_healthy(START_TIMEOUT_S)
        _wait_for_log(worker, "serving")
        time.sleep(0.5)  # their first claims found nothing: now each waits 30 s unless woken
        yield Deployment(store, api, worker, serve_node, key)
    finally:
        for child in (worker, serve_node, api):
            child.kill()  # a job may be mid-run: no drain needed, the store is thrown away
        store.close()
        redis.stop()


def test_serve_node_worker_wakes_on_a_submit_made_through_another_node(
    deployment: Deployment,
) -> None:
    # qwen-image: the worker process does not serve it, so only the serve node can take it.
    request_id = deployment.submit("qwen-image")
    deployment.wait_until(request_id, {"PROCESSING", "COMPLETED"})
    assert deployment.serve_node.process is not None
    assert f"-{deployment.serve_node.process.pid}-" in deployment.ran_by(request_id)


def test_worker_process_wakes_on_a_submit_made_through_an_api_node(
    deployment: Deployment,
) -> None:
    # Runs after the serve-node test (file order): stop that node so that only the worker
    # process serves qwen-image-fast.
    deployment.serve_node.kill()
    request_id = deployment.submit("qwen-image-fast")
    deployment.wait_until(request_id, {"PROCESSING", "COMPLETED"})
    assert deployment.worker.process is not None
    assert f"-{deployment.worker.process.pid}-" in deployment.ran_by(request_id)


def test_v1_on_an_api_node_returns_as_soon_as_a_worker_process_ends_the_job(
    deployment: Deployment,
) -> None:
    # Only the worker process serves qwen-image-fast; the API node has no worker of its own.
    deployment.serve_node.kill()
    # The pipeline is loaded (by the test before, or here when run alone) before the timed call.
    warm = deployment.submit("qwen-image-fast")
    deployment.wait_until(warm, {"COMPLETED"}, within_s=START_TIMEOUT_S)

    started = time.monotonic()
    response = httpx.post(
        f"{deployment.api.url}/v1/qwen-image-fast",
        headers={"x-api-key": deployment.key},
        json=body_for("qwen-image-fast"),
        timeout=START_TIMEOUT_S,
    )
    took_s = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("image/")
    # Woken by the job's end, not by the 30 s re-read (a wake-up is milliseconds; the run and
    # a loaded 2-core machine are the rest).
    assert took_s < WOKEN_WITHIN_S, f"POST /v1 took {took_s:.1f} s"
    assert deployment.worker.process is not None
    assert f"-{deployment.worker.process.pid}-" in deployment.ran_by(
        response.headers["x-request-id"]
    )
