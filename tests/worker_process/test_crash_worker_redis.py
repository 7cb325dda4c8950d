"""SIGKILL of a ``qwenserve worker``'s engine process mid-job on Redis (a real redis-server, an
API node with no workers and a worker process): the API answers within a second meanwhile, the
job runs again in the worker's new engine process and completes, and so does the next one,
each charged once; the worker's own process never loads torch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import Server, WorkerProcess
from tests.redis_server import RedisServer, needs_redis
from tests.worker_process.children import (
    answers_within_a_second,
    credits,
    denoising,
    engine_child,
    kill9,
    maps_torch,
    terminal,
    wait_for,
)
from tests.worker_process.test_crash_serve import QUICK, SLOW, price, submit

pytestmark = [pytest.mark.redis, needs_redis]


@pytest.fixture
def node(
    tmp_path: Path, shared_cache: Path, redis_server: RedisServer
) -> Iterator[tuple[Server, WorkerProcess]]:
    env = {"QWENSERVE_STORE": redis_server.url, "QWENSERVE_LEASE_S": "6"}
    api = Server(
        data_dir=tmp_path / "api", cache_dir=shared_cache, extra_env=env, args=["--workers", "0"]
    )
    worker = WorkerProcess(
        store_url=redis_server.url,
        data_dir=tmp_path / "worker",
        cache_dir=shared_cache,
        extra_env={"QWENSERVE_LEASE_S": "6", "QWENSERVE_LOG_LEVEL": "INFO"},
    )
    try:
        api.start()
        worker.start()
        yield api, worker
    finally:
        worker.stop()
        api.stop()


def test_worker_survives_its_engine_killed_mid_job(node: tuple[Server, WorkerProcess]) -> None:
    api, worker = node
    assert worker.process is not None
    child = engine_child(worker.process.pid, timeout_s=180)
    key = api.create_key(credits=10.0)
    before = credits(api.url, key)
    job = submit(api, key, SLOW)
    wait_for(lambda: denoising(api.url, key, job), 240, "denoising job")
    assert maps_torch(child) and not maps_torch(worker.process.pid)
    kill9(child)
    assert answers_within_a_second(api.url, key, job, for_s=2.0) >= 6
    done = wait_for(lambda: terminal(api.url, key, job), 240, "end of the killed job")
    assert done["status"] == "COMPLETED", done
    assert engine_child(worker.process.pid) != child
    after = submit(api, key, QUICK)
    assert wait_for(lambda: terminal(api.url, key, after), 120, "next job")["status"] == "COMPLETED"
    assert before - credits(api.url, key) == pytest.approx(2 * price(api))  # once each
    logs = worker.logs()
    assert f"job {job} back to the queue (attempt 1 of 3)" in logs
    assert "killed by SIGKILL" in logs
