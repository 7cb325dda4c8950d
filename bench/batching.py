"""Benchmark: throughput of 8 concurrent same-shape requests, batching on versus off.

    python bench/batching.py [--rounds 3] [--requests 8] [--api v1|v2] [--poll-s 0.25]
        [--steps 8] [--cache-dir DIR] [--quick] [--doc PATH | --no-write] [--json PATH]

A real `qwenserve serve` on the tiny preset, once with QWENSERVE_MAX_BATCH=REQUESTS and a short
batch window, once with QWENSERVE_MAX_BATCH=1. Each round sends REQUESTS qwen-image-fast requests
at once, from REQUESTS client threads with kept-alive connections, and times until the last
image is back (median of
rounds, after a warm-up round). With --api v1 (default) each client makes a sync call and gets
its image in the response; with --api v2 each submits and polls its status every --poll-s
seconds, then fetches the result. Target from the issue: >= 2x on the tiny preset on a 2-core
CPU. The clients run on the same two cores as the server: a tight poll (say every 10 ms from 8
clients) is itself hundreds of requests a second competing with the model for the CPU.
``--quick``: one round of 2 requests at 2 steps (bench/report.py has the options every benchmark
shares).
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

from bench.report import bench_args, publish, table  # noqa: E402

BODY = {"prompt": "a lighthouse at dusk", "steps": 8, "aspect_ratio": "1:1"}


def one_round(
    server: Server,
    clients: list[httpx.Client],
    pool: ThreadPoolExecutor,
    round_index: int,
    args: argparse.Namespace,
) -> float:
    """One burst: every client sends one request at once; seconds until the last image."""

    def sync_call(client: httpx.Client, body: dict[str, object]) -> None:
        response = client.post(f"{server.url}/v1/qwen-image-fast", json=body)
        response.raise_for_status()
        assert response.headers["content-type"] == "image/png"

    def submit_and_poll(client: httpx.Client, body: dict[str, object]) -> None:
        response = client.post(f"{server.url}/v2/qwen-image-fast", json=body)
        response.raise_for_status()
        urls = response.json()
        while True:
            status = client.get(urls["status_url"]).json()["status"]
            if status == "COMPLETED":
                break
            if status == "FAILED":
                raise RuntimeError(client.get(urls["response_url"]).text)
            time.sleep(args.poll_s)
        client.get(urls["response_url"]).raise_for_status()

    def one_client(index: int) -> None:
        body = {**BODY, "steps": args.steps, "seed": round_index * 1000 + index}
        (sync_call if args.api == "v1" else submit_and_poll)(clients[index], body)

    start = time.perf_counter()
    list(pool.map(one_client, range(len(clients))))
    return time.perf_counter() - start


def measure(tmp: Path, max_batch: int, args: argparse.Namespace) -> float:
    server = Server(
        data_dir=tmp / f"data-{max_batch}",
        cache_dir=args.cache_dir or tmp / "cache",
        extra_env={
            "QWENSERVE_MAX_BATCH": str(max_batch),
            "QWENSERVE_BATCH_WINDOW_S": str(args.window) if max_batch > 1 else "0",
            "QWENSERVE_LOG_LEVEL": "WARNING",
        },
    ).start()
    # Clients keep their connections between rounds, as real ones do (no TCP set-up timed).
    headers = {"x-api-key": server.create_key(credits=1000.0)}
    clients = [httpx.Client(headers=headers, timeout=300) for _ in range(args.requests)]
    try:
        with ThreadPoolExecutor(args.requests) as pool:
            one_round(server, clients, pool, 0, args)  # warm-up: loads the pipeline
            times = [one_round(server, clients, pool, r + 1, args) for r in range(args.rounds)]
    finally:
        for client in clients:
            client.close()
        server.stop()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--window", type=float, default=0.05, help="batch window (s)")
    parser.add_argument("--api", choices=("v1", "v2"), default="v1")
    parser.add_argument("--poll-s", type=float, default=0.25, help="v2 status poll period")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = bench_args(parser, {"rounds": 1, "requests": 2, "steps": 2})
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
    publish(
        args,
        f"Batching: {n} concurrent same-shape requests (tiny, qwen-image-fast, {args.steps} "
        f"steps; {args.api}, window {args.window * 1000:.0f} ms)",
        lines,
        [
            "through a real server, "
            + (
                f"{n} concurrent sync v1 calls"
                if args.api == "v1"
                else f"{n} concurrent v2 submits, status polled every {args.poll_s} s"
            )
            + f"; median of {args.rounds} rounds after a warm-up round"
        ],
        {"requests": n, "off_s": off, "on_s": on, "speedup": off / on},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
