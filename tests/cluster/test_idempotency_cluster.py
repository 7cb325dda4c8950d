"""Idempotency across a real scale-out: 50 duplicate submits spread over two API node processes
on one redis-server make one job and one charge."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.processes import Server, qwenserve
from tests.redis_server import RedisServer, needs_redis
from tests.service.helpers import body_for

pytestmark = [pytest.mark.redis, needs_redis]


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> Iterator[tuple[RedisServer, list[Server]]]:
    tmp_path = tmp_path_factory.mktemp("idem-cluster")
    redis = RedisServer()
    redis.start()
    env = {"QWENSERVE_STORE": redis.url}
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
        yield redis, apis
    finally:
        for api in apis:
            api.stop()
        redis.stop()


def test_fifty_duplicates_across_two_nodes_make_one_job_and_one_charge(
    nodes: tuple[RedisServer, list[Server]], tmp_path: Path
) -> None:
    redis, apis = nodes
    key = (
        qwenserve(
            "keys", "create", "--store", redis.url, "--credits", "10",
            env={"QWENSERVE_DATA_DIR": str(tmp_path / "cli")},
        )
        .strip()
        .splitlines()[-1]
    )  # fmt: skip
    headers = {"x-api-key": key, "Idempotency-Key": "cluster-burst"}
    body = body_for("qwen-image-fast", prompt="one job only")

    def post(n: int) -> httpx.Response:
        return httpx.post(
            f"{apis[n % 2].url}/v2/qwen-image-fast", headers=headers, json=body, timeout=30
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(post, range(50)))
    assert {r.status_code for r in responses} == {200}, [r.text for r in responses[:3]]
    ids = {r.json()["request_id"] for r in responses}
    assert len(ids) == 1
    [fresh] = [r for r in responses if "Idempotent-Replayed" not in r.headers]
    [request_id] = ids
    status = httpx.get(
        f"{apis[1].url}/v2/requests/{request_id}/status", headers={"x-api-key": key}, timeout=10
    ).json()
    credits = httpx.get(
        f"{apis[0].url}/v1/get-user-credits", headers={"x-api-key": key}, timeout=10
    ).json()["credits"]
    charged_once = float(fresh.headers["x-remaining-credits"])
    assert 0 < charged_once < 10.0
    assert credits == pytest.approx(charged_once)
    assert status["status"] == "QUEUED"
