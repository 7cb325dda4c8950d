"""Benchmark: CFG's two transformer passes per step as one batch, versus two calls.

    python bench/cfg_batch.py [--runs 5] [--steps 30] [--cache-dir DIR] [--quick]
        [--doc PATH | --no-write] [--json PATH]

qwen-image (true CFG, guidance 3.5) through two engines on the tiny preset, ``cfg_batch`` on
and off, runs alternating after a warm-up; median seconds per image, the transformer calls each
makes, and the largest per-channel difference between their images (8-bit levels).
``--quick``: one run at 2 steps (bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import bench_args, publish, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = bench_args(parser, {"runs": 1, "steps": 2})

    import numpy as np

    from qwenserve.catalog import get_model, validate_request
    from qwenserve.runtime import Engine, EngineConfig

    with tempfile.TemporaryDirectory() as tmp:
        engines = {
            on: Engine(
                EngineConfig(weights="tiny", cache_dir=args.cache_dir or Path(tmp), cfg_batch=on)
            )
            for on in (True, False)
        }
        times: dict[bool, list[float]] = {True: [], False: []}
        images: dict[bool, Any] = {}
        for run in range(args.runs + 1):
            request = validate_request(
                "qwen-image", {"prompt": f"a lighthouse, take {run}", "steps": args.steps}
            )
            for on, engine in engines.items():
                start = time.perf_counter()
                images[on] = engine.generate(request).image
                if run:  # the first run warms up
                    times[on].append(time.perf_counter() - start)
        difference = np.abs(
            np.asarray(images[True], dtype=np.int16) - np.asarray(images[False], dtype=np.int16)
        ).max()
        pairer = engines[True]._resident_for(get_model("qwen-image").recipe).cfg
        paired_per_image = (pairer.batched_calls if pairer else 0) / (args.runs + 1)
    on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
    rows = [
        ["off (two calls per step)", f"{off_s:.3f}", "", ""],
        ["on (one paired call per step)", f"{on_s:.3f}", f"{off_s / on_s:.2f}x", str(difference)],
    ]
    lines = table(["cfg_batch", "s per image", "speed-up", "max difference (levels)"], rows)
    print("\n".join(lines))
    print(f"paired transformer calls per image: {paired_per_image:.0f} (steps: {args.steps})")
    publish(
        args,
        f"CFG passes paired (tiny preset, qwen-image, {args.steps} steps, guidance 3.5)",
        lines,
        [
            f"median of {args.runs} alternating runs after a warm-up, a new prompt each run; "
            f"{paired_per_image:.0f} paired transformer calls per image with it on"
        ],
        {
            "on_s": on_s,
            "off_s": off_s,
            "speedup": off_s / on_s,
            "max_difference_levels": int(difference),
            "paired_calls_per_image": paired_per_image,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
