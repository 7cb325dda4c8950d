"""Benchmark: seconds per denoising step and per 1024x1024 image on a GPU, against the FLOP limit.

    python bench/gpu_step_time.py [--runs 2] [--peak-tflops 800] [--quick] [--doc PATH | --no-write]
        [--json PATH]

With the random-full preset (the real 20B Qwen-Image transformer, random bf16 weights) through
``Engine.generate``: qwen-image (30 and 50 steps, true CFG: two transformer forwards per
step, two separate calls: ``cfg_batch`` is off by default on CUDA) and qwen-image-fast (8 steps,
Lightning, no CFG), all at exactly 1024x1024. One forward at 1024x1024 with 200 text tokens is
about 72 TFLOP (``bench/step_timing.py`` has the formula), so the FLOP-count limit per step is
72 (x2 with CFG) / --peak-tflops seconds
(800 TFLOP/s: H100 dense bf16); the ratio limit / measured is the share of peak achieved.
Per-step time is the median gap between step callbacks (CUDA synchronised); per image is the
median wall time of a whole request. Results are printed and written to docs/PERFORMANCE.md
(or ``--doc``; replacing this benchmark's previous section) with the date, machine and command.
``--quick``: one timed request per case (bench/report.py has the options every benchmark shares).

It needs CUDA: without it, it says so on stderr, writes nothing and exits with status 3
(``EXIT_NO_CUDA``), so that a caller (``make bench``, the smoke test) can tell "no GPU here" from
a failure; the CPU proof of the GPU code paths is ``bench/gpu_verify.py --dry-run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import (  # noqa: E402
    QUICK_NOTE,
    bench_args,
    command_line,
    write_json,
    write_section,
)
from bench.step_timing import QWEN_IMAGE, StepClock, image_tokens  # noqa: E402

EXIT_NO_CUDA = 3
"""Exit status without a CUDA device: nothing measured, nothing written."""
TFLOP_PER_FORWARD_1024 = QWEN_IMAGE.forward_flop(image_tokens(1024, 1024), 200) / 1e12
CASES = (("qwen-image", 30, 4.0), ("qwen-image", 50, 4.0), ("qwen-image-fast", 8, 1.0))
"""The issue's yardsticks: the 50-step CFG image within 1.2x of its FLOP limit (8.6 s on an
H100; the best published open engine takes 12.8 s); the 8-step Lightning image under 1.2 s."""


def measure(
    cache_dir: Path, runs: int, peak_tflops: float
) -> tuple[list[str], list[dict[str, float | str]]]:
    import torch

    from qwenserve.catalog import validate_request
    from qwenserve.runtime import Engine, EngineConfig

    engine = Engine(EngineConfig(weights="random-full", cache_dir=cache_dir, device="cuda"))
    rows = []
    figures: list[dict[str, float | str]] = []
    for slug, steps, guidance in CASES:
        body = {"prompt": "a lighthouse at dusk", "steps": steps, "guidance": guidance, "seed": 1}
        request = dataclasses.replace(validate_request(slug, body), width=1024, height=1024)
        engine.generate(dataclasses.replace(request, steps=2))  # warm-up
        step_s: list[float] = []
        image_s: list[float] = []
        for _ in range(runs):
            clock = StepClock(torch.cuda.synchronize)
            started = clock.start()
            engine.generate(request, on_step=clock)
            torch.cuda.synchronize()
            image_s.append(time.perf_counter() - started)
            step_s.extend(clock.step_s())
        forwards = 2 if guidance > 1 else 1
        limit_s = TFLOP_PER_FORWARD_1024 * forwards / peak_tflops
        measured_s = statistics.median(step_s)
        per_image_s = statistics.median(image_s)
        rows.append(
            f"| {slug} | {steps} | {'yes' if forwards == 2 else 'no'} | {measured_s:.3f} | "
            f"{per_image_s:.2f} | {limit_s:.3f} | {limit_s / measured_s:.2f} | "
            f"{per_image_s / (limit_s * steps):.2f} |"
        )
        print(rows[-1])
        figures.append(
            {
                "slug": slug,
                "steps": steps,
                "s_per_step": measured_s,
                "s_per_image": per_image_s,
                "limit_s_per_step": limit_s,
            }
        )
    return rows, figures


def section_text(rows: list[str], args: argparse.Namespace, device: str) -> str:
    command = command_line()
    lines = [
        "",
        "## Seconds per denoising step at 1024x1024 (random-full, GPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {device}; {platform.machine()}, {os.cpu_count()} cores",
        f"- command: `{command}`",
        *([f"- {QUICK_NOTE}"] if args.quick else []),
    ]
    lines += [
        f"- FLOP limit: {TFLOP_PER_FORWARD_1024:.0f} TFLOP per transformer forward at 1024x1024"
        f" (x2 with CFG) at {args.peak_tflops:.0f} TFLOP/s; ratio = limit / measured",
        "",
        "| slug | steps | CFG | s/step | s/image | limit s/step | limit / measured, per step |"
        " image / (steps x limit) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="timed requests per slug")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="dense bf16 peak")
    args = bench_args(parser, {"runs": 1})
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_step_time.py needs CUDA (a GPU) and none is available here: nothing measured, "
            f"nothing written (exit status {EXIT_NO_CUDA})",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    device = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as scratch:
        rows, figures = measure(Path(scratch), args.runs, args.peak_tflops)
    section = section_text(rows, args, device)
    print(section)
    write_json(args, {"device": device, "cases": figures})
    if not args.no_write:
        write_section(section.strip().splitlines()[0].removeprefix("## "), section, doc=args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
