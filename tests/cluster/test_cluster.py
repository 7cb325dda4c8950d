"""Scale-out for real: redis-server, two API nodes and two workers, each its own process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import Server, WorkerProcess, qwenserve
from tests.redis_server import RedisServer, needs_redis
from tests.service.helpers import body_for

pytestmark = [
    pytest.mark.redis,
    needs_redis,
]


@dataclass
class Cluster:
    redis: RedisServer
    apis: list[Server]
    workers: list[WorkerProcess]
    cache_dir: Path
    tmp: Path

    @property
    def store_url(self) -> str:
        return self.redis.url

    def key(self, credits: float, rpm: int = 0) -> str:
        out = qwenserve(
            "keys",
            "create",
            "--store",
            self.store_url,
            "--credits",
            str(credits),
            "--rpm",
            str(rpm),
            env={"QWENSERVE_DATA_DIR": str(self.tmp / "cli")},
        )
        return out.strip().splitlines()[-1]

    def add_worker(self, *args: str) -> WorkerProcess:
        worker = WorkerProcess(
            store_url=self.store_url,
            data_dir=self.tmp / f"worker{len(self.workers)}",
            cache_dir=self.cache_dir,
            args=list(args),
            extra_env={"QWENSERVE_LEASE_S": "3", "QWENSERVE_LOG_LEVEL": "INFO"},
        )
        self.workers.append(worker.start())
        return worker

    def status(self, api: Server, key: str, request_id: str) -> dict[str, object]:
        response = httpx.get(
            f"{api.url}/v2/requests/{request_id}/status", headers={"x-api-key": key}, timeout=10
        )
        assert response.status_code in (200, 422), response.text
        return dict(response.json())

    def wait_terminal(self, key: str, ids: list[str], timeout_s: float) -> dict[str, str]:
        deadline = time.time() + timeout_s
        states: dict[str, str] = {}
        while time.time() < deadline:
            states = {
                i: str(self.status(self.apis[n % len(self.apis)], key, i)["status"])
                for n, i in enumerate(ids)
            }
            if all(s in ("COMPLETED", "FAILED") for s in states.values()):
                return states
            time.sleep(0.25)
        return states


@pytest.fixture(scope="module")
def running_cluster(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> Iterator[Cluster]:
    """Redis and two API nodes, started once for the module (the slow part)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(appendonly=True, dir=tmp_path / "redis")
    redis.start()
    env = {"QWENSERVE_STORE": redis.url, "QWENSERVE_LOG_LEVEL": "INFO"}
    apis = [
        Server(
            data_dir=tmp_path / f"api{i}",
            cache_dir=shared_cache,
            extra_env=env,
            args=["--workers", "0"],
        ).start()
        for i in range(2)
    ]
    try:
        yield Cluster(redis, apis, [], shared_cache, tmp_path)
    finally:
        for api in apis:
            api.stop()
        redis.stop()


@pytest.fixture
def cluster(running_cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster with no workers yet; a test's workers stop when it ends, and API
    nodes a test killed are started again."""
    try:
        yield running_cluster
    finally:
        for worker in running_cluster.workers:
            worker.stop()
        running_cluster.workers.clear()
        for api in running_cluster.apis:
            if api.process is None or api.process.poll() is not None:
                api.start()


def submit(api: Server, key: str, slug: str = "qwen-image-fast", **overrides: object) -> str:
    response = httpx.post(
        f"{api.url}/v2/{slug}", headers={"x-api-key": key}, json=body_for(slug, **overrides)
    )
    assert response.status_code == 200, response.text
    return str(response.json()["request_id"])


def test_thirty_jobs_across_two_nodes_none_lost(cluster: Cluster) -> None:
    cluster.add_worker()
    cluster.add_worker()
    key = cluster.key(credits=10.0)
    ids = [submit(cluster.apis[i % 2], key, seed=i) for i in range(30)]
    states = cluster.wait_terminal(key, ids, timeout_s=180)
    assert list(states.values()).count("COMPLETED") == 30, states
    # Any node serves any request, with the same result and a media URL that works everywhere.
    for request_id in ids[:4]:
        bodies = [
            httpx.get(f"{api.url}/v2/requests/{request_id}", headers={"x-api-key": key}).json()
            for api in cluster.apis
        ]
        assert bodies[0]["seed"] == bodies[1]["seed"]
        assert httpx.get(bodies[1]["output"]).status_code == 200
    credits = httpx.get(
        f"{cluster.apis[1].url}/v1/get-user-credits", headers={"x-api-key": key}
    ).json()["credits"]
    assert credits == pytest.approx(10.0 - 30 * 0.02)
    # Both workers took part, and the ops view sees them.
    status = qwenserve("status", "--store", cluster.store_url, "--json")
    assert '"workers"' in status
    metrics = httpx.get(f"{cluster.apis[0].url}/metrics").text
    assert "qwenserve_workers 2.0" in metrics
    # Both worker processes' own figures reach the other API node through their announcements
    # (each announces when a batch ends): every job's inference time, counted once.
    deadline = time.time() + 15
    while True:
        families = text_string_to_metric_families(httpx.get(f"{cluster.apis[1].url}/metrics").text)
        counts = {
            sample.labels["worker"]: sample.value
            for family in families
            for sample in family.samples
            if sample.name == "qwenserve_job_inference_seconds_count"
        }
        if sum(counts.values()) == 30 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert sum(counts.values()) == 30, counts


def test_v1_sync_through_api_node_without_worker(cluster: Cluster) -> None:
    cluster.add_worker()
    key = cluster.key(credits=1.0)
    response = httpx.post(
        f"{cluster.apis[0].url}/v1/qwen-image-fast",
        headers={"x-api-key": key},
        json=body_for("qwen-image-fast"),
        timeout=120,
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def test_worker_killed_mid_job_another_finishes_it(cluster: Cluster) -> None:
    victim = cluster.add_worker()
    key = cluster.key(credits=10.0)
    # Long enough on the tiny preset that the kill lands mid-job.
    request_id = submit(cluster.apis[0], key, "qwen-image", steps=40, aspect_ratio="1:1")
    deadline = time.time() + 60
    while time.time() < deadline:
        if cluster.status(cluster.apis[0], key, request_id)["status"] == "PROCESSING":
            break
        time.sleep(0.05)
    victim.kill()
    cluster.add_worker()
    states = cluster.wait_terminal(key, [request_id], timeout_s=120)
    assert states[request_id] == "COMPLETED"
    result = httpx.get(
        f"{cluster.apis[1].url}/v2/requests/{request_id}", headers={"x-api-key": key}
    ).json()
    assert result["status"] == "COMPLETED"


def test_api_node_restart_loses_nothing(cluster: Cluster) -> None:
    key = cluster.key(credits=5.0)
    ids = [submit(cluster.apis[0], key, seed=i) for i in range(5)]
    cluster.apis[0].kill()
    cluster.add_worker()
    cluster.apis[0].start()
    states = cluster.wait_terminal(key, ids, timeout_s=120)
    assert set(states.values()) == {"COMPLETED"}


def test_redis_restart_with_aof_loses_nothing(cluster: Cluster) -> None:
    key = cluster.key(credits=5.0)
    ids = [submit(cluster.apis[i % 2], key, seed=i) for i in range(6)]
    cluster.redis.restart()
    cluster.add_worker()
    states = cluster.wait_terminal(key, ids, timeout_s=120)
    assert set(states.values()) == {"COMPLETED"}


def test_credits_exact_under_concurrent_submits_on_two_nodes(cluster: Cluster) -> None:
    key = cluster.key(credits=0.02 * 37)  # enough for exactly 37 qwen-image-fast runs

    def one(index: int) -> int:
        api = cluster.apis[index % 2]
        return httpx.post(
            f"{api.url}/v2/qwen-image-fast",
            headers={"x-api-key": key},
            json=body_for("qwen-image-fast", seed=index),
            timeout=60,
        ).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(one, range(100)))
    assert codes.count(200) == 37 and codes.count(406) == 63
    credits = httpx.get(
        f"{cluster.apis[0].url}/v1/get-user-credits", headers={"x-api-key": key}
    ).json()["credits"]
    assert credits == pytest.approx(0.0, abs=1e-9)
