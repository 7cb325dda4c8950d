"""Benchmark: what the changes since an earlier revision cost the queue endpoints, side by side
in one run (job control: one heartbeat per worker, the event log, live status fields; metrics:
HTTP instrumentation, workers' figures).

    python bench/revision_overhead.py --baseline REV [--against REV] [--seconds 4] [--rounds 2]
        [--cache-dir DIR] [--quick] [--doc PATH | --no-write] [--json PATH]

The baseline revision (and ``--against``, when given; else this checkout) is checked out into a
temporary git worktree and served from its own ``src`` (``PYTHONPATH``). For each side, alternating
A B A B so that drift on a shared machine hits both alike, it measures with 16 concurrent async
clients in this process:

1. status polls / s of a QUEUED job on an API-only node (now: queue position and ETA added);
2. submits / s on an API-only node (now: a ``queued`` event in the same transaction);
3. status polls / s and submits / s while one in-process worker runs jobs back to back (now:
   the worker's heartbeat every second, progress, an event per claim and per end).

The ratio new / baseline of each figure is the cost (1.00 = none; the target is ≥ 0.95).
Results are printed and written to docs/PERFORMANCE.md (or ``--doc``; replacing this benchmark's
previous section) with the date, machine and command. ``--quick``: one round of 0.3 s each
(bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import Server  # noqa: E402

from bench import revisions  # noqa: E402
from bench.load import hammer  # noqa: E402
from bench.report import bench_args, publish, table  # noqa: E402
from bench.revisions import Side  # noqa: E402

SLUG = "qwen-image"
SUBMIT = {"prompt": "a lighthouse at dusk", "steps": 2, "seed": 1, "aspect_ratio": "1:1"}
BUSY_JOB = {"prompt": "a harbour at night", "steps": 20, "seed": 2, "aspect_ratio": "1:1"}
"""Jobs that keep the worker denoising (about 0.3 s each on the tiny preset on a CPU)."""


def serve(side: Side, data_dir: Path, cache_dir: Path, workers: int) -> tuple[Server, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    key = side.create_key(data_dir, cache_dir)
    server = Server(
        data_dir=data_dir,
        cache_dir=cache_dir,
        args=["--workers", str(workers)],
        extra_env=side.env(),
    )
    server.start()
    return server, key


def measure(side: Side, tmp: Path, cache_dir: Path, seconds: float) -> dict[str, float]:
    """The four figures of one side (fresh data dirs, so both start from empty stores)."""
    figures: dict[str, float] = {}
    url_submit = f"/v2/{SLUG}"
    server, key = serve(side, tmp / f"{side.name}-api", cache_dir, workers=0)
    try:
        headers = {"x-api-key": key}
        queued = httpx.post(server.url + url_submit, headers=headers, json=SUBMIT).json()
        figures["polls idle"] = asyncio.run(
            hammer(queued["status_url"], "GET", seconds, headers, None)
        )
        figures["submits idle"] = asyncio.run(
            hammer(server.url + url_submit, "POST", seconds, headers, SUBMIT)
        )
    finally:
        server.stop()

    server, key = serve(side, tmp / f"{side.name}-busy", cache_dir, workers=1)
    try:
        headers = {"x-api-key": key}
        with httpx.Client(headers=headers, timeout=30) as client:
            # Enough work that the worker denoises through both measurements.
            for _ in range(int(seconds * 2 / 0.3) + 20):
                client.post(server.url + url_submit, json=BUSY_JOB).raise_for_status()
            last = client.post(server.url + url_submit, json=BUSY_JOB).json()
        figures["polls busy"] = asyncio.run(
            hammer(last["status_url"], "GET", seconds, headers, None)
        )
        figures["submits busy"] = asyncio.run(
            hammer(server.url + url_submit, "POST", seconds, headers, SUBMIT)
        )
    finally:
        server.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--against", help="git revision measured (default: this checkout)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = bench_args(parser, {"seconds": 0.3, "rounds": 1})

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with revisions.sides(tmp, args.baseline, args.against) as pair:
            runs: dict[str, list[dict[str, float]]] = {side.name: [] for side in pair}
            for round_index in range(args.rounds):
                for side in pair if round_index % 2 == 0 else reversed(pair):
                    round_tmp = tmp / f"round{round_index}"
                    cache = args.cache_dir or tmp / "cache"
                    runs[side.name].append(measure(side, round_tmp, cache, args.seconds))
                    print(side.name, runs[side.name][-1], flush=True)

    base, this = (runs[side.name] for side in pair)
    rows = []
    figures = {}
    for name in base[0]:
        old = statistics.median(r[name] for r in base)
        new = statistics.median(r[name] for r in this)
        figures[name] = {"baseline": old, "measured": new, "ratio": new / old}
        rows.append([f"{name} (/s)", f"{old:.0f}", f"{new:.0f}", f"{new / old:.3f}"])
    lines = table(["measure", *(side.name for side in pair), "ratio"], rows)
    print("\n".join(lines))
    publish(
        args,
        f"Queue endpoints: {pair[1].name} vs {pair[0].name.removeprefix('baseline ')}",
        lines,
        [
            f"16 concurrent async clients in this process, {args.seconds:g} s each; "
            f"{args.rounds} rounds alternating the sides; medians",
            "idle: API-only node (`--workers 0`); busy: one in-process worker denoising "
            "tiny-preset jobs back to back; polls read a QUEUED job",
        ],
        {"sides": [side.name for side in pair], "per_second": figures},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
