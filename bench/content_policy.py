"""Benchmark: what the content policy costs per request, next to the generation it guards.

    python bench/content_policy.py [--runs 20] [--terms 1000] [--cache-dir DIR] [--quick]
        [--doc PATH | --no-write] [--json PATH]

Measures, in one run on this machine: the prompt check (``PromptPolicy.blocks`` on a 60-word
prompt against TERMS plain terms and 20 regular expressions, after NFKC/case/zero-width
normalization) per prompt; the default image classifier (NudeNet's ONNX detector through
``NudeNetClassifier.score``, what the worker runs on each output and each edit input) per image
on the tiny preset's own output and on synthetic benign images at 1024² and 1328²; and the tiny
preset's generation of that output (qwen-image-fast, 2 steps, CPU), for the ratio. Medians after
a warm-up. Needs the optional extra: ``pip install 'qwenserve[nsfw]'`` (NudeNet, AGPL-3.0).
``--quick``: one run, 50 terms (bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import bench_args, publish, table  # noqa: E402

PROMPT = (
    "A quiet harbour town at dawn, fishing boats moored along a stone quay, gulls over the "
    "water, warm light on whitewashed houses with blue shutters, a lighthouse on the point, "
    "mist on the hills behind, a cat asleep on a coil of rope, crates of lemons by a cafe "
    "door, long shadows, film grain, shot on a 35mm lens, soft pastel palette, calm mood"
)


def benign_scene(size: int = 1024) -> Image.Image:
    """A drawn landscape (sky, sun, hills, a house, a tree): plainly safe, photo-ish colours."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(size):  # sky to grass gradient
        t = y / size
        colour = (int(90 + 120 * t), int(150 + 60 * t), int(235 - 120 * t))
        draw.line([(0, y), (size, y)], fill=colour)
    s = size / 1024
    draw.ellipse([760 * s, 90 * s, 900 * s, 230 * s], fill=(255, 220, 90))
    draw.polygon(
        [
            (0, 700 * s),
            (350 * s, 520 * s),
            (700 * s, 690 * s),
            (1024 * s, 560 * s),
            (1024 * s, 1024 * s),
            (0, 1024 * s),
        ],
        fill=(70, 140, 70),
    )
    draw.rectangle([380 * s, 560 * s, 620 * s, 760 * s], fill=(200, 80, 60))
    draw.polygon([(360 * s, 560 * s), (500 * s, 440 * s), (640 * s, 560 * s)], fill=(90, 50, 40))
    draw.rectangle([470 * s, 660 * s, 530 * s, 760 * s], fill=(60, 40, 30))
    draw.rectangle([160 * s, 560 * s, 190 * s, 760 * s], fill=(90, 60, 30))
    draw.ellipse([100 * s, 430 * s, 250 * s, 590 * s], fill=(40, 110, 50))
    noise = np.random.default_rng(0).normal(0, 4, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def median_ms(call: Callable[[], Any], runs: int) -> float:
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def term_list(count: int) -> list[str]:
    from qwenserve.policy.prompt import PromptPolicy

    rng = np.random.default_rng(3)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(4, 10)))) for _ in range(count)]
    regexes = [f"re:\\b{w[:3]}\\w*{w[-2:]}\\b" for w in words[:20]]
    # None may match the benchmark's prompt: a blocked prompt would stop at the first match.
    return [t for t in words + regexes if not PromptPolicy.from_lines([t]).blocks(PROMPT)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--terms", type=int, default=1000)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = bench_args(parser, {"runs": 1, "terms": 50})

    from qwenserve.catalog import validate_request
    from qwenserve.policy.nudenet import NudeNetClassifier
    from qwenserve.policy.prompt import PromptPolicy
    from qwenserve.runtime import Engine, EngineConfig

    policy = PromptPolicy.from_lines(term_list(args.terms))
    tricky = PROMPT.replace("lighthouse", "light\u200bhouse").upper()
    prompt_us = median_ms(lambda: policy.blocks(PROMPT), args.runs * 50) * 1000
    tricky_us = median_ms(lambda: policy.blocks(tricky), args.runs * 50) * 1000
    assert not policy.blocks(PROMPT)

    load_started = time.perf_counter()
    classifier = NudeNetClassifier()
    load_ms = (time.perf_counter() - load_started) * 1000

    with tempfile.TemporaryDirectory() as cache:
        engine = Engine(
            EngineConfig(weights="tiny", cache_dir=args.cache_dir or Path(cache), resident_models=1)
        )
        request = validate_request("qwen-image-fast", {"prompt": PROMPT, "steps": 2, "seed": 11})
        engine.generate(request)  # load and warm up
        generation_ms = median_ms(lambda: engine.generate(request), max(1, args.runs // 5))
        tiny = engine.generate(request).image

    images = {
        f"tiny preset output ({tiny.width}x{tiny.height})": tiny,
        "benign scene 1024x1024": benign_scene(1024),
        "benign scene 1328x1328": benign_scene(1328),
    }
    rows = [
        [
            f"prompt check, {args.terms} terms + 20 regexes",
            "60-word prompt",
            f"{prompt_us / 1000:.3f}",
            "",
        ],
        [
            "prompt check, same list",
            "upper case, a zero-width space",
            f"{tricky_us / 1000:.3f}",
            "",
        ],
    ]
    figures: dict[str, Any] = {
        "prompt_check_ms": prompt_us / 1000,
        "prompt_check_tricky_ms": tricky_us / 1000,
        "classifier_load_ms": load_ms,
        "classifier_ms": {},
        "classifier_score": {},
    }
    for name, image in images.items():
        score = classifier.score(image)
        assert score < 0.5, f"{name} scored {score:.3f}"
        ms = median_ms(lambda i=image: classifier.score(i), args.runs)  # type: ignore[misc]
        ratio = f"{ms / generation_ms:.1%}" if name.startswith("tiny") else ""
        rows.append([f"NudeNet score (score {score:.2f})", name, f"{ms:.1f}", ratio])
        figures["classifier_ms"][name] = ms
        figures["classifier_score"][name] = score
    figures["generation_ms"] = generation_ms
    rows.append(
        ["tiny preset generation", "qwen-image-fast, 2 steps, CPU", f"{generation_ms:.0f}", ""]
    )
    lines = table(["what", "on", "median (ms)", "of the tiny generation"], rows)
    print("\n".join(lines))
    publish(
        args,
        "Content policy: prompt check and image classifier per request",
        lines,
        [
            f"median of {args.runs} runs after a warm-up (prompt check: {args.runs * 50}), "
            "one thread; NudeNet 3.4.2 (320n ONNX model, onnxruntime on the CPU)",
            f"classifier load (once per worker process): {load_ms:.0f} ms",
            "the classifier runs on the worker's finisher thread, so in a busy worker its "
            "time overlaps the next job's denoising; a lone request's latency grows by it",
            "a real model's generation takes seconds per image on a GPU, so the "
            "classifier's share there is far smaller than against the tiny preset",
            "the figures move with the machine's load (the 1-min load above; 2 cores "
            "shared with other work when this ran)",
        ],
        figures,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
