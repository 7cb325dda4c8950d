"""Benchmark: throughput of 8 concurrent same-shape requests, batching on versus off.

    python bench/batching.py [--rounds 3] [--requests 8] [--no-write]

A real `qwenserve serve` on the tiny preset, once with QWENSERVE_MAX_BATCH=REQUESTS and a short
batch window, once with QWENSERVE_MAX_BATCH=1. Each round submits REQUESTS qwen-image-fast
requests at once through v2 and times until the last one is COMPLETED (median of rounds, after a
warm-up round). Target from the issue: >= 2x on the tiny preset on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import Server  # noqa: E402

from bench.report import append_section, table  # noqa: E402

BODY = {"prompt": "a lighthouse at dusk", "steps": 8, "aspect_ratio": "1:1"}


def one_round(server: Server, key: str, requests: int, round_index: int) -> float:
    headers = {"x-api-key": key}

    def submit(index: int) -> str:
        body = {**BODY, "seed": round_index * 1000 + index}
        response = httpx.post(f"{server.url}/v2/qwen-image-fast", headers=headers, json=body)
        response.raise_for_status()
        return str(response.json()["request_id"])

    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        ids = list(pool.map(submit, range(requests)))
    pending = set(ids)
    with httpx.Client(headers=headers) as client:
        while pending:
            for request_id in list(pending):
                status = client.get(f"{server.url}/v2/requests/{request_id}/status").json()
                if status["status"] == "COMPLETED":
                    pending.discard(request_id)
                elif status["status"] == "FAILED":
                    raise RuntimeError(status)
            time.sleep(0.01)
    return time.perf_counter() - start


def measure(tmp: Path, max_batch: int, args: argparse.Namespace) -> float:
    server = Server(
        data_dir=tmp / f"data-{max_batch}",
        cache_dir=tmp / "cache",
        extra_env={
            "QWENSERVE_MAX_BATCH": str(max_batch),
            "QWENSERVE_BATCH_WINDOW_S": str(args.window) if max_batch > 1 else "0",
            "QWENSERVE_LOG_LEVEL": "WARNING",
        },
    ).start()
    try:
        key = server.create_key(credits=1000.0)
        one_round(server, key, args.requests, 0)  # warm-up: loads the pipeline
        times = [one_round(server, key, args.requests, r + 1) for r in range(args.rounds)]
    finally:
        server.stop()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--window", type=float, default=0.1, help="batch window (s)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = measure(Path(tmp), 1, args)
        on = measure(Path(tmp), args.requests, args)
    n = args.requests
    lines = table(
        ["batching", f"time for {n} requests (s)", "images / s"],
        [
            ["off (max_batch 1)", f"{off:.2f}", f"{n / off:.2f}"],
            [
                f"on (max_batch {n}, window {args.window * 1000:.0f} ms)",
                f"{on:.2f}",
                f"{n / on:.2f}",
            ],
            ["speed-up", "", f"{off / on:.2f}x"],
        ],
    )
    print("\n".join(lines))
    if not args.no_write:
        append_section(
            f"Batching: {n} concurrent same-shape requests (tiny, qwen-image-fast, 8 steps)",
            lines,
            ["through a real server, v2 submit + status polling every 10 ms; median of rounds"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
