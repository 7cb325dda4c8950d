"""Benchmark: encoding a generated image for download, ours versus Pillow's defaults.

    python bench/encoding.py [--size 1024] [--runs 5] [--image PATH] [--quick]
        [--doc PATH | --no-write] [--json PATH]

Encoding is on every request's critical path (a sync caller waits for it). Per format, the median
time and size of ``qwenserve.media.encode.encode_image`` next to Pillow's default ``save`` (PNG:
zlib level 6, adaptive filters; WEBP: method 4), on two synthetic images of SIZE x SIZE (a smooth
photo-like one and uniform noise, what the tiny preset makes) and, with --image, a picture of
your own resized to SIZE x SIZE. PNG output is checked to decode to the same pixels.
``--quick``: 128 x 128, one run (bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import bench_args, publish, table  # noqa: E402


def photo_like(size: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with a little sensor-like noise: compresses like a photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.zeros((size, size, 3))
    for channel in range(3):
        for _ in range(6):
            a, b, phase = rng.uniform(1, 12, 3)
            pixels[..., channel] += np.sin(a * x + b * y + phase)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 230
    pixels += rng.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def noise(size: int) -> Image.Image:
    array = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(array, mode="RGB")


def pillow_default(image: Image.Image, kind: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind.upper(), quality=quality)
    return buffer.getvalue()


def timed(call: Callable[[], bytes], runs: int) -> tuple[float, int]:
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        data = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, len(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", type=Path, help="also a picture of your own")
    args = bench_args(parser, {"size": 128, "runs": 1})

    from qwenserve.media.encode import WEBP_METHOD, encode_image

    images = {"photo-like (synthetic)": photo_like(args.size), "noise": noise(args.size)}
    if args.image:
        picture = Image.open(args.image).convert("RGB").resize((args.size, args.size))
        images[args.image.name] = picture
    rows = []
    figures = []
    for name, image in images.items():
        for kind, quality in (("png", 90), ("webp", 90), ("jpeg", 90)):
            ours_ms, ours_bytes = timed(
                lambda i=image, k=kind, q=quality: encode_image(i, k, q), args.runs
            )
            base_ms, base_bytes = timed(
                lambda i=image, k=kind, q=quality: pillow_default(i, k, q), args.runs
            )
            if kind == "png":
                decoded = Image.open(io.BytesIO(encode_image(image, kind, quality)))
                assert decoded.tobytes() == image.tobytes(), "PNG must be lossless"
            rows.append(
                [
                    name,
                    kind,
                    f"{base_ms:.1f}",
                    f"{ours_ms:.1f}",
                    f"{base_ms / ours_ms:.1f}x",
                    f"{base_bytes / 1024:.0f}",
                    f"{ours_bytes / 1024:.0f}",
                ]
            )
            print(rows[-1])
            figures.append(
                {
                    "image": name,
                    "format": kind,
                    "pillow_ms": base_ms,
                    "qwenserve_ms": ours_ms,
                    "pillow_bytes": base_bytes,
                    "qwenserve_bytes": ours_bytes,
                }
            )
    lines = table(
        [
            "image",
            "format",
            "Pillow default (ms)",
            "qwenserve (ms)",
            "speed-up",
            "Pillow size (KiB)",
            "qwenserve size (KiB)",
        ],
        rows,
    )
    print("\n".join(lines))
    publish(
        args,
        f"Encoding a {args.size}x{args.size} result (PNG / WEBP / JPEG, quality 90)",
        lines,
        [
            f"median of {args.runs} runs after a warm-up, one thread",
            "qwenserve PNG: numpy Up filter + ISA-L deflate level 1 (lossless, checked); "
            f"WEBP: method {WEBP_METHOD}; JPEG: Pillow's defaults on both sides",
        ],
        {"encodings": figures},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
