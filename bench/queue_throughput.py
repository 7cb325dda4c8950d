"""Benchmark: one API node on SQLite versus on Redis; latency from submit to a worker starting.

    python bench/queue_throughput.py [--seconds 5] [--jobs 10] [--no-write]

1. Submits per second and status polls per second against one API node with no worker
   (`--workers 0`), on the embedded SQLite store and on a real redis-server, 16 concurrent async
   clients each.
2. Added latency from submit to a worker starting the job (the job's queue_time: started_at -
   created_at), one job at a time on an idle system: the embedded in-process worker on SQLite
   versus a separate `qwenserve worker` process over Redis.
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
from bench.report import append_section, table  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    quiet = {"QWENSERVE_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "cache"
        sqlite_api = Server(tmp / "sqlite-api", cache, extra_env=quiet, args=["--workers", "0"])
        sqlite_api.start()
        try:
            sqlite_rates = throughput(sqlite_api, args.seconds)
        finally:
            sqlite_api.stop()
        embedded = Server(tmp / "sqlite-embedded", cache, extra_env=quiet).start()
        try:
            sqlite_wait = queue_latency(embedded, args.jobs)
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
        ],
    )
    print("\n".join(lines))
    if not args.no_write:
        append_section(
            "Queue throughput and dispatch latency: SQLite vs Redis",
            lines,
            [
                f"throughput: 16 concurrent async clients, {args.seconds:g} s, no worker",
                f"latency: {args.jobs} sequential jobs, idle worker (embedded thread on SQLite; a "
                "separate `qwenserve worker` process on Redis)",
            ],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
