"""Benchmark: what the server adds around the engine, and how fast its queue endpoints are.

    python bench/server_overhead.py [--runs 10] [--seconds 5] [--cache-dir DIR] [--quick]
        [--doc PATH | --no-write] [--json PATH]

1. A v1 request through a real `qwenserve serve` (tiny preset) versus the same request run by the
   engine directly in this process (median wall time; the ratio is the overhead).
2. Status polls per second and submits per second against one server on this machine, versus a
   bare FastAPI endpoint on uvicorn returning the same JSON (the ceiling for this stack), each
   driven by concurrent httpx clients in this process.

Results are printed and written to docs/PERFORMANCE.md (or ``--doc``; replacing this benchmark's
previous section) with the date, machine and command. ``--quick``: one run each, 0.25 s of load
(bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import Server, free_port  # noqa: E402

from bench.load import hammer  # noqa: E402
from bench.report import bench_args, publish, table  # noqa: E402

BODY = {"prompt": "a lighthouse at dusk", "steps": 8, "seed": 1234, "aspect_ratio": "1:1"}
SLUG = "qwen-image-fast"


def engine_direct(cache_dir: Path, runs: int) -> float:
    from qwenserve.catalog import validate_request
    from qwenserve.media.encode import encode_image
    from qwenserve.runtime import Engine, EngineConfig

    engine = Engine(EngineConfig(weights="tiny", cache_dir=cache_dir))
    request = validate_request(SLUG, BODY)
    times = []
    for index in range(runs + 1):
        start = time.perf_counter()
        out = engine.generate(request)
        encode_image(out.image, request.image_format, request.quality)
        if index:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def server_v1(server: Server, key: str, runs: int) -> float:
    times = []
    with httpx.Client(headers={"x-api-key": key}, timeout=120) as client:
        for index in range(runs + 1):
            start = time.perf_counter()
            response = client.post(f"{server.url}/v1/{SLUG}", json=BODY)
            response.raise_for_status()
            if index:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


BARE_APP = """
import sys
from fastapi import FastAPI
from fastapi.responses import JSONResponse
import uvicorn
app = FastAPI()
BODY = {"status": "QUEUED", "request_id": "00000000-0000-0000-0000-000000000000",
        "status_url": "http://127.0.0.1/v2/requests/x/status",
        "response_url": "http://127.0.0.1/v2/requests/x", "metrics": {"cost": 0.02}}
@app.get("/status")
async def status() -> JSONResponse:
    return JSONResponse(BODY)
@app.post("/submit")
async def submit() -> JSONResponse:
    return JSONResponse(BODY)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def bare_fastapi(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port)])
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/status", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("bare FastAPI did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = bench_args(parser, {"runs": 1, "seconds": 0.25})

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cache = args.cache_dir or tmp_path / "cache"
        direct = engine_direct(cache, args.runs)

        server = Server(
            data_dir=tmp_path / "data",
            cache_dir=cache,
            extra_env={"QWENSERVE_LOG_LEVEL": "WARNING"},
        )
        server.start()
        try:
            key = server.create_key(credits=1_000_000.0, rpm=0)
            through = server_v1(server, key, args.runs)
            headers = {"x-api-key": key}
            # A status poll of a real (completed) request, and submits of a job the worker
            # then has to run: the worker is stopped so the queue only grows (API cost alone).
            job = httpx.post(f"{server.url}/v2/{SLUG}", headers=headers, json=BODY).json()
            status_url = job["status_url"]
            polls = asyncio.run(hammer(status_url, "GET", args.seconds, headers, None))
        except Exception:
            print(server.logs()[-5000:], file=sys.stderr)  # why the server failed
            raise
        finally:
            server.stop()

        api_only = Server(
            data_dir=tmp_path / "data2",
            cache_dir=cache,
            args=["--workers", "0"],
            extra_env={"QWENSERVE_LOG_LEVEL": "WARNING"},
        )
        api_only.start()
        try:
            key = api_only.create_key(credits=1_000_000.0, rpm=0)
            submits = asyncio.run(
                hammer(f"{api_only.url}/v2/{SLUG}", "POST", args.seconds, {"x-api-key": key}, BODY)
            )
        finally:
            api_only.stop()

        port = free_port()
        bare = bare_fastapi(port)
        try:
            bare_polls = asyncio.run(
                hammer(f"http://127.0.0.1:{port}/status", "GET", args.seconds, {}, None)
            )
            bare_submits = asyncio.run(
                hammer(f"http://127.0.0.1:{port}/submit", "POST", args.seconds, {}, BODY)
            )
        finally:
            bare.terminate()
            bare.wait()

    rows = [
        (
            "v1 request, median s (server vs engine direct)",
            f"{through:.4f}",
            f"{direct:.4f}",
            f"{through / direct:.3f}",
        ),
        (
            "status polls / s (server vs bare FastAPI)",
            f"{polls:.0f}",
            f"{bare_polls:.0f}",
            f"{polls / bare_polls:.3f}",
        ),
        (
            "submits / s (server vs bare FastAPI)",
            f"{submits:.0f}",
            f"{bare_submits:.0f}",
            f"{submits / bare_submits:.3f}",
        ),
    ]
    lines = table(["measure", "qwenserve", "reference", "ratio"], [list(r) for r in rows])
    print("\n".join(lines))
    publish(
        args,
        "Server overhead and queue throughput (tiny preset)",
        lines,
        [f"load: 16 concurrent async clients in this process, {args.seconds:g} s each"],
        {
            "v1_server_s": through,
            "v1_engine_s": direct,
            "polls_per_s": polls,
            "bare_polls_per_s": bare_polls,
            "submits_per_s": submits,
            "bare_submits_per_s": bare_submits,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
