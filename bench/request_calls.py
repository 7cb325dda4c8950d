"""Benchmark: Python function calls per request on the queue endpoints, two revisions side by
side. A count, not a time: it does not move with the machine's load, so it finds an overhead
that throughput runs on a shared 2-core machine cannot tell from noise.

    python bench/request_calls.py --baseline REV [--against REV] [--polls 2000] [--submits 1000]
        [--quick] [--doc PATH | --no-write] [--json PATH]

Each side's ``qwenserve serve --workers 0`` runs under ``cProfile`` three times: started and
stopped with no request, with ``--polls`` status polls of a QUEUED job, and with ``--submits``
submits; calls per request are the differences over the request counts. cProfile sees the event
loop's thread (routing, middleware, dependencies, handlers, rendering), not the store's calls in
the thread pool, whose cost ``bench/revision_overhead.py`` measures in time. Results are printed
and written to docs/PERFORMANCE.md (or ``--doc``). ``--quick``: 20 polls, 10 submits
(bench/report.py has the options every benchmark shares); ``--baseline HEAD`` compares the
working tree with its last commit.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import free_port  # noqa: E402

from bench import revisions  # noqa: E402
from bench.report import bench_args, publish, table  # noqa: E402
from bench.revision_overhead import SLUG, SUBMIT  # noqa: E402
from bench.revisions import Side  # noqa: E402


def profiled_calls(side: Side, tmp: Path, polls: int, submits: int) -> int:
    """Total function calls of one profiled server run that answers ``polls`` then
    ``submits`` requests (one queued job first, and 20 warm-up polls, in every run)."""
    data_dir = tmp / f"{side.name.replace(' ', '-')}-{polls}-{submits}"
    data_dir.mkdir(parents=True)
    key = side.create_key(data_dir, tmp / "cache")
    out = data_dir / "profile.out"
    port = free_port()
    env = {
        **os.environ,
        **side.env(),
        "QWENSERVE_DATA_DIR": str(data_dir),
        "QWENSERVE_CACHE_DIR": str(tmp / "cache"),
    }
    command = ["-m", "qwenserve.cli.main", "serve", "--port", str(port), "--workers", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cProfile", "-o", str(out), *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(headers={"x-api-key": key}, timeout=60) as client:
            _wait_healthy(client, url, process)
            status_url = client.post(f"{url}/v2/{SLUG}", json=SUBMIT).json()["status_url"]
            for _ in range(20 + polls):
                client.get(status_url).raise_for_status()
            for _ in range(submits):
                client.post(f"{url}/v2/{SLUG}", json=SUBMIT).raise_for_status()
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn exits cleanly; cProfile writes its file
        process.wait(60)
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    return sum(entry[1] for entry in stats.values())


def _wait_healthy(client: httpx.Client, url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError("the server exited before it was healthy")
        try:
            if client.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server was not healthy in 60 s")


def measure(side: Side, tmp: Path, polls: int, submits: int) -> dict[str, float]:
    idle = profiled_calls(side, tmp, 0, 0)
    return {
        "calls per status poll": (profiled_calls(side, tmp, polls, 0) - idle) / polls,
        "calls per submit": (profiled_calls(side, tmp, 0, submits) - idle) / submits,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--against", help="git revision measured (default: this checkout)")
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--submits", type=int, default=1000)
    args = bench_args(parser, {"polls": 20, "submits": 10})

    with (
        tempfile.TemporaryDirectory() as tmp_name,
        revisions.sides(Path(tmp_name), args.baseline, args.against) as pair,
    ):
        figures = [measure(side, Path(tmp_name), args.polls, args.submits) for side in pair]
    old, new = figures
    rows = [[n, f"{old[n]:.0f}", f"{new[n]:.0f}", f"{new[n] / old[n]:.3f}"] for n in old]
    lines = table(["measure", *(side.name for side in pair), "ratio"], rows)
    print("\n".join(lines))
    publish(
        args,
        f"Python calls per request: {pair[1].name} vs {pair[0].name.removeprefix('baseline ')}",
        lines,
        [
            f"`--workers 0` server under cProfile; {args.polls} polls of a QUEUED job, "
            f"{args.submits} submits, each less a run with no request; lower is better",
            "the event loop's thread only (the store's calls run in the thread pool)",
        ],
        {"sides": [side.name for side in pair], "baseline": old, "measured": new},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
