"""Benchmark: the engine's time for one request versus calling the diffusers pipeline directly.

    python bench/engine_vs_diffusers.py [--runs 3] [--max-steps N] [--cache-dir DIR] [--quick]
        [--doc PATH | --no-write] [--json PATH]

Per slug on the tiny preset: ``Engine.generate`` (adapter switching, scheduler choice, NaN check,
conversion to an RGB image) against the very pipeline object the engine holds, called with the
arguments the engine passes (``Engine.prepare_call``), a fresh seeded generator each run. Each
side gets one warm-up run, then ``--runs`` runs alternating between the two (so load from other
work falls on both alike); the medians' ratio is the engine's overhead.

Results are printed and written to docs/PERFORMANCE.md (or ``--doc``; replacing this benchmark's
previous section) with the date, machine and command; ``--quick`` is one run per side at 2 steps
(bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import (  # noqa: E402
    QUICK_NOTE,
    bench_args,
    command_line,
    write_json,
    write_section,
)

# Requests as a client sends them. qwen-image-2512's explicit size stays within what the tiny
# preset generates at (TINY_MAX_EXPLICIT_AREA): above it the tiny preset generates smaller and
# resizes, a step real weights never take, which would be timed on the server side only.
# Qwen-Image 2.1 runs twice per slug: text-to-image, and an edit with two references (its
# references are optional; the other edit slugs get their one required image). Its fast slug
# runs the checkpoint's own step count.
REQUESTS: list[tuple[str, dict[str, Any], int]] = [
    ("qwen-image", {"prompt": "a lighthouse at dusk", "steps": 30, "seed": 1}, 0),
    ("qwen-image-fast", {"prompt": "a lighthouse at dusk", "steps": 8, "seed": 1}, 0),
    ("qwen-image-2512", {"prompt": "a lighthouse", "steps": 6, "width": 384, "height": 384}, 0),
    ("qwen-image-edit-fast", {"prompt": "make the sky red", "steps": 8, "seed": 1}, 1),
    ("qwen-image-edit-plus-product-photography", {"prompt": "on a marble table", "seed": 1}, 1),
    ("qwen-image-2.1", {"prompt": "a lighthouse at dusk", "steps": 40, "seed": 1}, 0),
    ("qwen-image-2.1", {"prompt": "the two at dusk", "steps": 40, "seed": 1}, 2),
    ("qwen-image-2.1-fast", {"prompt": "a lighthouse at dusk", "seed": 1}, 0),
    ("qwen-image-2.1-fast", {"prompt": "the two at dusk", "seed": 1}, 2),
]


def requests(max_steps: int | None = None) -> list[tuple[str, dict[str, Any], int]]:
    """``REQUESTS``, each request's steps capped at ``max_steps`` (the smoke runs' setting)."""
    from qwenserve.catalog import get_model

    out = []
    for slug, body, references in REQUESTS:
        capped = dict(body)
        if max_steps is not None and get_model(slug).param("steps") is not None:
            capped["steps"] = min(int(body.get("steps", max_steps)), max_steps)
        out.append((slug, capped, references))
    return out


def label(slug: str, references: int) -> str:
    """A request's name in the tables: the slug, and its references where they are optional
    (Qwen-Image 2.1 runs with none and with two)."""
    from qwenserve.catalog import get_model

    if get_model(slug).recipe.images_optional:
        return f"{slug}, {references} references"
    return slug


def _interleaved_medians_s(first: Any, second: Any, runs: int) -> tuple[float, float]:
    """Median times of two calls, run alternately after one warm-up each."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for call, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            call()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(
    cache_dir: Path, runs: int, max_steps: int | None = None
) -> list[tuple[str, str, float, float]]:
    import base64
    import io

    import numpy as np
    import torch
    from PIL import Image

    from qwenserve.catalog import get_model, validate_request
    from qwenserve.runtime import Engine, EngineConfig
    from qwenserve.runtime.condition_area import capped_condition_area
    from qwenserve.runtime.sizes import TINY_AREA

    # Prompt cache off: both sides encode the prompt, so the ratio is the engine's overhead.
    engine = Engine(
        EngineConfig(weights="tiny", cache_dir=cache_dir, resident_models=4, prompt_cache_size=0)
    )
    picture = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8), mode="RGB"
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")

    rows = []
    for slug, body, references in requests(max_steps):
        spec = get_model(slug)
        full = dict(body)
        images = [picture] * references
        for name in spec.image_fields[:references]:
            full[name] = encoded
        request = validate_request(slug, full)
        prepared = engine.prepare_call(request, images)
        kwargs = dict(prepared.kwargs)
        seed = request.seed

        def through_engine(r: Any = request, i: Any = images) -> None:
            engine.generate(r, images=i)

        def direct(p: Any = prepared.pipeline, k: dict[str, Any] = kwargs, s: int = seed) -> None:
            # The engine leaves the adapters and scheduler of this request's last call in place;
            # the tiny preset's edits encode their inputs at TINY_AREA, on both sides.
            with capped_condition_area(TINY_AREA):
                p(**{**k, "generator": torch.Generator(device="cpu").manual_seed(s)})

        engine_s, direct_s = _interleaved_medians_s(through_engine, direct, runs)
        size = f"{prepared.size.width}x{prepared.size.height}, {request.steps} steps"
        if spec.recipe.images_optional:
            size += f", {references} references"
        rows.append((slug, size, engine_s, direct_s))
        print(f"{slug:42s} {size:22s} engine {engine_s:7.3f}s  diffusers {direct_s:7.3f}s")
    return rows


TITLE = "Engine vs direct diffusers call (tiny preset)"


def section_text(
    rows: list[tuple[str, str, float, float]], args: argparse.Namespace, load_before: float
) -> str:
    command = command_line()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    import torch

    lines = [
        "",
        f"## {TITLE}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- command: `{command}`",
        f"- 1-minute load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}"
        " (other work on the machine skews both columns alike)",
        "- what: median wall time of one request after a warm-up, runs alternating; "
        "`Engine.generate`",
        "  versus the same pipeline object called with the same arguments (`Engine.prepare_call`)",
        *([f"- {QUICK_NOTE}"] if args.quick else []),
        "",
        "| slug | size, steps | engine (s) | diffusers (s) | engine / diffusers |",
        "|---|---|---:|---:|---:|",
    ]
    for slug, size, engine_s, direct_s in rows:
        lines.append(
            f"| {slug} | {size} | {engine_s:.3f} | {direct_s:.3f} | {engine_s / direct_s:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    parser.add_argument("--max-steps", type=int, help="cap every request's steps at this")
    args = bench_args(parser, {"runs": 1, "max_steps": 2})
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        rows = measure(args.cache_dir or Path(scratch), args.runs, args.max_steps)
    section = section_text(rows, args, load_before)
    print(section)
    figures = {
        "requests": [
            {"slug": slug, "size": size, "engine_s": engine_s, "direct_s": direct_s}
            for slug, size, engine_s, direct_s in rows
        ]
    }
    write_json(args, figures)
    if not args.no_write:
        write_section(TITLE, section, doc=args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
