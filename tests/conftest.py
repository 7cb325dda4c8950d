"""Fixtures every test folder may use, and the order test files start in.

The suite runs on ``pytest-xdist`` workers (``-n``, ``--dist loadfile`` in pyproject.toml): a
file runs whole on one worker (its module-scoped servers start once), and much of the suite
waits on the processes it spawns rather than on the CPU. The files that take longest start
first (``LONGEST_FIRST``), so none of them is left running alone at the end, and torch runs
one thread per process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per process (this worker and every server it spawns inherit it): the
    # workers already keep both cores busy, and torch's waiting threads spin, so a second
    # thread per process costs CPU the other workers need (tests/bench/smoke_runner.py
    # measured 77 s of CPU with two threads under load against 15 s with one).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

LONGEST_FIRST = (
    "tests/bench/test_bench_smoke.py",
    "tests/s3/test_s3_service.py",
    "tests/cluster/test_cluster.py",
    "tests/bench/test_gpu_verify.py",
    "tests/worker_process/test_crash_serve.py",
    "tests/ha/test_failover_cluster.py",
    "tests/service/test_lifecycle.py",
    "tests/service/test_webhook_process.py",
    "tests/service/test_errors.py",
    "tests/service/test_segmind_sdk.py",
    "tests/worker_process/test_crash_worker_redis.py",
    "tests/worker_process/test_stop_serve.py",
    "tests/cluster/test_outage_load.py",
    "tests/service/test_playground.py",
    "tests/service/test_openai_clients.py",
    "tests/runtime/test_engine.py",
    "tests/store/test_redis_store.py",
    "tests/store/test_sqlite_store.py",
    "tests/ha/test_failover.py",
    "tests/s3/test_s3_store.py",
    "tests/service/test_openapi_fuzz.py",
    "tests/service/test_playground_features.py",
    "tests/service/test_readme.py",
)
"""Test files by how long they take (the longest first); the rest follow in their usual order.
A file missing here only starts later: the order changes the suite's wall time, never what a
test sees."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # one process: keep pytest's own order
        return
    rank = {path: n for n, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath

    def key(item: pytest.Item) -> int:
        relative = item.path.relative_to(root).as_posix()
        return rank.get(relative, len(rank))

    items.sort(key=key)  # stable: within a file, and among the rest, the order stays


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache (tiny preset, fetched LoRAs) for every server and worker in the run: on
    xdist, one for all its workers (a tiny preset built by two processes at once is built once,
    ``runtime/tiny.py``)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "model-cache"
        cache.mkdir(exist_ok=True)
        return cache
    return tmp_path_factory.mktemp("model-cache")
