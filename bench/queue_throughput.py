"""Benchmark: one API node on SQLite versus on Redis; latency from submit to a worker starting.

    python bench/queue_throughput.py [--seconds 5] [--jobs 10] [--v1-requests 7] [--cache-dir DIR]
        [--quick] [--doc PATH | --no-write] [--json PATH]

1. Submits per second and status polls per second against one API node with no worker
   (`--workers 0`), on the embedded SQLite store and on a real redis-server, 16 concurrent async
   clients each.
2. Added latency from submit to a worker starting the job (the job's queue_time: started_at -
   created_at), one job at a time on an idle system: the embedded in-process worker on SQLite
   versus a separate `qwenserve worker` process over Redis.
3. A sync `POST /v1` request, one at a time on an idle system, on the same two set-ups (on Redis
   the API node has no worker: the job's end reaches it from the worker process through Redis):
   the median wall time, and the median time from the job's end (its ``finished_at`` in the
   store) to the client holding the response: how long the API node takes to notice the end,
   read the image and answer.

Needs the ``redis-server`` binary. ``--quick``: 0.5 s of load, one job, one v1 request
(bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis as redis_py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import Server, WorkerProcess  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

from bench.load import hammer  # noqa: E402
from bench.report import bench_args, publish, table  # noqa: E402
from qwenserve.backends import open_backend  # noqa: E402
from qwenserve.config import Settings  # noqa: E402

BODY = {"prompt": "a lighthouse", "steps": 2, "aspect_ratio": "1:1", "seed": 3}
SLUG = "qwen-image-fast"


def throughput(server: Server, seconds: float) -> tuple[float, float]:
    try:
        return _throughput(server, seconds)
    except Exception:
        print(server.logs()[-5000:], file=sys.stderr)
        raise


def _throughput(server: Server, seconds: float) -> tuple[float, float]:
    key = server.create_key(credits=1e9)
    headers = {"x-api-key": key}
    submits = asyncio.run(hammer(f"{server.url}/v2/{SLUG}", "POST", seconds, headers, BODY))
    job = httpx.post(f"{server.url}/v2/{SLUG}", headers=headers, json=BODY).json()
    polls = asyncio.run(hammer(job["status_url"], "GET", seconds, headers, None))
    return submits, polls


def queue_latency(server: Server, jobs: int) -> float:
    key = server.create_key(credits=1e9)
    headers = {"x-api-key": key}
    waits = []
    with httpx.Client(headers=headers, timeout=120) as client:
        for index in range(jobs + 1):
            job = client.post(f"{server.url}/v2/{SLUG}", json={**BODY, "seed": index}).json()
            while True:
                body = client.get(job["response_url"]).json()
                if body["status"] == "COMPLETED":
                    break
                time.sleep(0.02)
            if index:  # the first loads the pipeline
                waits.append(body["metrics"]["queue_time"])
            time.sleep(0.3)  # let the worker go idle, as a lone request would find it
    return statistics.median(waits)


def v1_latency(server: Server, requests: int) -> tuple[float, float]:
    """Median wall time of a POST /v1, and from its job's end to the response, in seconds."""
    key = server.create_key(credits=1e9)
    store_url = server.extra_env.get("QWENSERVE_STORE", "sqlite")
    backend = open_backend(Settings(data_dir=server.data_dir, store=store_url))
    store = backend.store
    walls, after_end = [], []
    try:
        with httpx.Client(headers={"x-api-key": key}, timeout=120) as client:
            for index in range(requests + 1):
                body = {**BODY, "seed": 100 + index}
                started = time.perf_counter()
                response = client.post(f"{server.url}/v1/{SLUG}", json=body)
                wall, received_at = time.perf_counter() - started, time.time()
                response.raise_for_status()
                job = store.get_job(response.headers["x-request-id"], now=received_at)
                assert job is not None and job.finished_at is not None
                if index:  # the first may load the pipeline
                    walls.append(wall)
                    after_end.append(received_at - job.finished_at)
                time.sleep(0.3)  # let the worker go idle, as a lone request would find it
    finally:
        backend.close()
    return statistics.median(walls), statistics.median(after_end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--v1-requests", type=int, default=7)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = bench_args(parser, {"seconds": 0.5, "jobs": 1, "v1_requests": 1})
    quiet = {"QWENSERVE_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = args.cache_dir or tmp / "cache"
        sqlite_api = Server(tmp / "sqlite-api", cache, extra_env=quiet, args=["--workers", "0"])
        sqlite_api.start()
        try:
            sqlite_rates = throughput(sqlite_api, args.seconds)
        finally:
            sqlite_api.stop()
        embedded = Server(tmp / "sqlite-embedded", cache, extra_env=quiet).start()
        try:
            sqlite_wait = queue_latency(embedded, args.jobs)
            sqlite_v1 = v1_latency(embedded, args.v1_requests)
        finally:
            embedded.stop()

        with RedisServer(dir=tmp / "redis") as redis:
            env = {**quiet, "QWENSERVE_STORE": redis.url}
            redis_api = Server(tmp / "redis-api", cache, extra_env=env, args=["--workers", "0"])
            redis_api.start()
            try:
                redis_rates = throughput(redis_api, args.seconds)
                # Start the latency test on an empty queue, not behind the jobs just submitted.
                redis_py.Redis.from_url(redis.url).flushall()
                worker = WorkerProcess(redis.url, tmp / "worker", cache, extra_env=quiet).start()
                try:
                    redis_wait = queue_latency(redis_api, args.jobs)
                    redis_v1 = v1_latency(redis_api, args.v1_requests)
                finally:
                    worker.stop()
            finally:
                redis_api.stop()

    lines = table(
        ["measure", "SQLite (embedded)", "Redis", "Redis / SQLite"],
        [
            [
                "submits / s, one API node",
                f"{sqlite_rates[0]:.0f}",
                f"{redis_rates[0]:.0f}",
                f"{redis_rates[0] / sqlite_rates[0]:.2f}",
            ],
            [
                "status polls / s, one API node",
                f"{sqlite_rates[1]:.0f}",
                f"{redis_rates[1]:.0f}",
                f"{redis_rates[1] / sqlite_rates[1]:.2f}",
            ],
            [
                "submit → worker start, median ms",
                f"{sqlite_wait * 1000:.1f}",
                f"{redis_wait * 1000:.1f}",
                f"{redis_wait / max(sqlite_wait, 1e-9):.2f}",
            ],
            [
                "POST /v1 wall time, median ms",
                f"{sqlite_v1[0] * 1000:.1f}",
                f"{redis_v1[0] * 1000:.1f}",
                f"{redis_v1[0] / max(sqlite_v1[0], 1e-9):.2f}",
            ],
            [
                "POST /v1 job end → response received, median ms",
                f"{sqlite_v1[1] * 1000:.1f}",
                f"{redis_v1[1] * 1000:.1f}",
                f"{redis_v1[1] / max(sqlite_v1[1], 1e-9):.2f}",
            ],
        ],
    )
    print("\n".join(lines))
    publish(
        args,
        "Queue throughput and dispatch latency: SQLite vs Redis",
        lines,
        [
            f"throughput: 16 concurrent async clients, {args.seconds:g} s, no worker",
            f"latency: {args.jobs} sequential jobs, idle worker (embedded thread on SQLite; a "
            "separate `qwenserve worker` process on Redis)",
            f"v1: {args.v1_requests} sequential POST /v1 after one warm-up, same set-ups (on "
            "Redis an API node with no worker, woken by the job's end through pub/sub)",
        ],
        {
            store: {
                "submits_per_s": rates[0],
                "polls_per_s": rates[1],
                "queue_wait_s": wait,
                "v1_wall_s": v1[0],
                "v1_end_to_response_s": v1[1],
            }
            for store, rates, wait, v1 in (
                ("sqlite", sqlite_rates, sqlite_wait, sqlite_v1),
                ("redis", redis_rates, redis_wait, redis_v1),
            )
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
