"""Benchmark: what "accepted means replicated" costs per submit (``QWENSERVE_REDIS_MIN_REPLICAS``).

    python bench/submit_wait.py [--submits 2000] [--quick] [--doc PATH | --no-write] [--json PATH]

Starts a Redis primary and one replica of it (real ``redis-server`` processes on loopback), then
times ``--submits`` submits one at a time, as an API node makes them, through two stores on the
same primary: ``min_replicas=0`` (the script alone: Redis replicates afterwards, asynchronously)
and ``min_replicas=1`` (the script and a ``WAIT 1`` in one pipeline: answered once the replica
acknowledged it). The two alternate submit by submit, so both see the same server state. Reports
the median and the 95th percentile in milliseconds and their ratio (with WAIT / without). On
loopback the replica's acknowledgement is one more round trip; across hosts add the network's.

Needs the ``redis-server`` binary. ``--quick``: 200 submits (bench/report.py has the options
every benchmark shares).
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

import redis  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

from bench.report import bench_args, publish, table  # noqa: E402
from qwenserve.catalog import validate_request  # noqa: E402
from qwenserve.jobs import Job, JobStatus  # noqa: E402
from qwenserve.store.base import ApiKey  # noqa: E402
from qwenserve.store.redis import RedisStore  # noqa: E402

SLUG = "qwen-image-fast"
REQUEST = validate_request(SLUG, {"prompt": "a lighthouse", "seed": 1})
SYNC_TIMEOUT_S = 30.0


def _wait_in_sync(replica: RedisServer) -> None:
    client = redis.Redis(port=replica.port, decode_responses=True)
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    try:
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica did not sync:\n{replica.logs()}")
            time.sleep(0.05)
    finally:
        client.close()


def _key(store: RedisStore, now: float) -> ApiKey:
    key = ApiKey(
        id=f"bench-{uuid.uuid4().hex[:8]}",
        key_hash=uuid.uuid4().hex,
        name="bench",
        balance_usd=1e9,
        rpm=0,
        created_at=now,
    )
    store.create_key(key)
    return key


def _submit_ms(store: RedisStore, key: ApiKey, now: float) -> float:
    job = Job(
        id=f"job-{uuid.uuid4().hex}",
        key_id=key.id,
        request=REQUEST,
        status=JobStatus.QUEUED,
        created_at=now,
        expires_at=now + 3600,
        cost_usd=0.0,
    )
    start = time.perf_counter()
    store.submit(job, rpm=0, now=now)
    return (time.perf_counter() - start) * 1000


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--submits", type=int, default=2000, help="submits timed per setting")
    args = bench_args(parser, {"submits": 200})
    now = time.time()
    times: dict[str, list[float]] = {"none": [], "wait1": []}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        with RedisServer(dir=tmp / "primary") as primary:
            replica = RedisServer(
                dir=tmp / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)]
            )
            with replica:
                _wait_in_sync(replica)
                plain = RedisStore.from_url(primary.url, namespace="benchplain")
                waiting = RedisStore.from_url(primary.url, namespace="benchwait", min_replicas=1)
                try:
                    keys = {"none": _key(plain, now), "wait1": _key(waiting, now)}
                    stores = {"none": plain, "wait1": waiting}
                    for name, store in stores.items():  # warm: scripts loaded, pools open
                        for _ in range(20):
                            _submit_ms(store, keys[name], now)
                    for _ in range(args.submits):
                        for name, store in stores.items():
                            times[name].append(_submit_ms(store, keys[name], now))
                finally:
                    plain.close()
                    waiting.close()
    figures: dict[str, float] = {}
    rows = []
    for name, label in (("none", "0 (no WAIT)"), ("wait1", "1 (WAIT 1)")):
        median, tail = statistics.median(times[name]), p95(times[name])
        figures[f"{name}_median_ms"] = median
        figures[f"{name}_p95_ms"] = tail
        rows.append([label, f"{median:.3f}", f"{tail:.3f}", f"{1000 / median:.0f}"])
        print(f"min_replicas {label}: median {median:.3f} ms, p95 {tail:.3f} ms")
    figures["median_ratio"] = figures["wait1_median_ms"] / figures["none_median_ms"]
    figures["p95_ratio"] = figures["wait1_p95_ms"] / figures["none_p95_ms"]
    rows.append(
        [
            "ratio (WAIT 1 / none)",
            f"{figures['median_ratio']:.2f}x",
            f"{figures['p95_ratio']:.2f}x",
            "",
        ]
    )
    print(f"ratio: median {figures['median_ratio']:.2f}x, p95 {figures['p95_ratio']:.2f}x")
    publish(
        args,
        "Submit cost of accepted-means-replicated (QWENSERVE_REDIS_MIN_REPLICAS)",
        table(
            ["min replicas", "submit median (ms)", "submit p95 (ms)", "submits/s (1 client)"], rows
        ),
        notes=[
            "one `RedisStore.submit` at a time (the admission script: key, rate, debit, insert, "
            "queue), a Redis primary and one replica on loopback, the two settings alternating "
            "submit by submit",
            "with 1: the script and `WAIT 1 <replica wait>` in one pipeline on one connection; "
            "the answer waits for the replica's acknowledgement (one more round trip here; "
            "across hosts, add the network's round trip to the replica)",
        ],
        figures=figures,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
