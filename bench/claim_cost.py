"""Benchmark: what one claim costs against queue depth and the number of waiting keys.

    python bench/claim_cost.py [--depths 1000,20000] [--keys 1,100,10000] [--claims 200]
        [--quick] [--doc PATH | --no-write] [--json PATH]

For each store (the embedded SQLite file and a real redis-server), each queue depth and each
number of keys: fill the queue with that many QUEUED jobs spread round-robin over that many keys
(never more keys than jobs), then time ``--claims`` claims of one job each, one at a time, as a
worker makes them (weighted fair queuing picks the key, ``store/fair.py``). Reports the median
and the 95th percentile in milliseconds. A flat row across depths and keys is the point: the
claim reads index heads, never the queue. Then times a status poll's queue position of the job
at the back of the queue (its place in the fair order, ``store/sqlite/fair_order.py``): one
ZRANK on Redis; on SQLite an index range count over the jobs ahead of it, so it grows with them.

Needs the ``redis-server`` binary. ``--quick``: depths 200 and 1000, keys 1 and 100, 50 claims
(bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.redis_server import RedisServer  # noqa: E402

from bench.report import bench_args, publish, table  # noqa: E402
from qwenserve.catalog import validate_request  # noqa: E402
from qwenserve.jobs import Job, JobStatus  # noqa: E402
from qwenserve.store.base import ApiKey, Store  # noqa: E402
from qwenserve.store.redis import RedisStore  # noqa: E402
from qwenserve.store.sqlite import SqliteStore  # noqa: E402

SLUG = "qwen-image-fast"
REQUEST = validate_request(SLUG, {"prompt": "a lighthouse", "seed": 1})


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def fill(store: Store, depth: int, keys: int, now: float) -> str:
    """``depth`` QUEUED jobs, round-robin over ``keys`` new keys; the last one's id."""
    made = []
    for index in range(min(keys, depth)):
        key = ApiKey(
            id=f"bench-{index}-{uuid.uuid4().hex[:6]}",
            key_hash=uuid.uuid4().hex,
            name="bench",
            balance_usd=1e9,
            rpm=0,
            created_at=now,
        )
        store.create_key(key)
        made.append(key)
    for index in range(depth):
        key = made[index % len(made)]
        job = Job(
            id=f"job-{uuid.uuid4().hex}",
            key_id=key.id,
            request=REQUEST,
            status=JobStatus.QUEUED,
            created_at=now,
            expires_at=now + 86400,
            cost_usd=0.0,
        )
        store.submit(job, rpm=0, now=now)
    return job.id


def claim_times_ms(store: Store, claims: int, now: float) -> list[float]:
    times = []
    for _ in range(claims):
        start = time.perf_counter()
        jobs = store.claim("bench-worker", slugs=[SLUG], lease_s=600, max_attempts=3, now=now)
        times.append((time.perf_counter() - start) * 1000)
        assert len(jobs) == 1, "the queue ran dry: raise the depth or lower --claims"
    return times


def position_times_ms(store: Store, job_id: str, polls: int, now: float) -> list[float]:
    """A status poll's queue-position read of ``job_id`` (the back of the queue: the most
    jobs before it in the fair order)."""
    times = []
    for _ in range(polls):
        start = time.perf_counter()
        position = store.queue_position(job_id, now=now)
        times.append((time.perf_counter() - start) * 1000)
        assert position is not None, "the job at the back was claimed: lower --claims"
    return times


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="1000,20000", help="queued jobs, comma-separated")
    parser.add_argument("--keys", default="1,100,10000", help="waiting keys, comma-separated")
    parser.add_argument("--claims", type=int, default=200, help="claims timed per setting")
    args = bench_args(parser, {"depths": "200,1000", "keys": "1,100", "claims": 50})
    depths, key_counts = _numbers(args.depths), _numbers(args.keys)
    figures: dict[str, dict[str, dict[str, float]]] = {"sqlite": {}, "redis": {}}
    rows = []
    now = time.time()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        with RedisServer(dir=tmp / "redis") as server:
            for name in ("sqlite", "redis"):
                for depth in depths:
                    for keys in key_counts:
                        label = f"{depth} jobs, {min(keys, depth)} keys"
                        if name == "sqlite":
                            store: Store = SqliteStore(tmp / f"claims-{depth}-{keys}.db")
                        else:
                            store = RedisStore.from_url(
                                server.url, namespace=f"bench{depth}x{keys}"
                            )
                        try:
                            last = fill(store, depth, keys, now)
                            times = claim_times_ms(store, min(args.claims, depth // 2), now)
                            polls = position_times_ms(store, last, args.claims, now)
                        finally:
                            store.close()
                        median, tail = statistics.median(times), p95(times)
                        position = statistics.median(polls)
                        figures[name][label] = {
                            "median_ms": median,
                            "p95_ms": tail,
                            "position_median_ms": position,
                            "position_p95_ms": p95(polls),
                        }
                        rows.append(
                            [
                                name,
                                str(depth),
                                str(min(keys, depth)),
                                f"{median:.3f}",
                                f"{tail:.3f}",
                                f"{position:.3f}",
                                f"{p95(polls):.3f}",
                            ]
                        )
                        print(
                            f"{name} {label}: median {median:.3f} ms, p95 {tail:.3f} ms; "
                            f"position of the last job {position:.3f} ms"
                        )
    publish(
        args,
        "Claim cost against queue depth and keys (weighted fair queuing)",
        table(
            [
                "store",
                "queued jobs",
                "keys",
                "claim median (ms)",
                "claim p95 (ms)",
                "position median (ms)",
                "position p95 (ms)",
            ],
            rows,
        ),
        notes=[
            "one claim of one job, one at a time, on a queue filled round-robin over the keys "
            "(never more keys than jobs: 10,000 keys at 1,000 jobs is 1,000)",
            "position: `Store.queue_position` of the last job submitted (the back of the queue, "
            "the most jobs ahead of it in the fair order), read as often as claims were timed, "
            "after the claims (at most half the queue)",
        ],
        figures=figures,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
