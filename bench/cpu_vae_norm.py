"""Benchmark: the tiny preset's VAE decode on a CPU, diffusers' channel norm versus ours.

    python bench/cpu_vae_norm.py [--runs 5] [--no-write]

Decodes 32x32 latents (a 256x256 image) at batch 1 and 8 with the tiny preset's VAE, first as
diffusers ships it (``F.normalize`` over the channel dimension), then after
``qwenserve.runtime.cpu_kernels.use_fast_vae_norms``; median times and the largest difference
between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import append_section, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKLQwenImage

    from qwenserve.catalog import PipelineKind
    from qwenserve.runtime.cpu_kernels import use_fast_vae_norms
    from qwenserve.runtime.tiny_preset import ensure_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        base = ensure_tiny_base(Path(tmp), "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
        vae = AutoencoderKLQwenImage.from_pretrained(base / "vae").eval()

    def median_s(latents: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            out = vae.decode(latents).sample
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                vae.decode(latents)
                times.append(time.perf_counter() - start)
        return statistics.median(times), out

    batches = {size: torch.randn(size, 16, 1, 32, 32) for size in (1, 8)}
    stock = {size: median_s(latents) for size, latents in batches.items()}
    use_fast_vae_norms(vae)
    fast = {size: median_s(latents) for size, latents in batches.items()}
    rows = []
    for size in batches:
        (stock_s, stock_out), (fast_s, fast_out) = stock[size], fast[size]
        difference = (stock_out - fast_out).abs().max().item()
        rows.append(
            [
                str(size),
                f"{stock_s * 1000:.1f}",
                f"{fast_s * 1000:.1f}",
                f"{stock_s / fast_s:.1f}x",
                f"{difference:.1e}",
            ]
        )
    lines = table(
        ["batch", "diffusers norm (ms)", "qwenserve norm (ms)", "speed-up", "max abs difference"],
        rows,
    )
    print("\n".join(lines))
    if not args.no_write:
        append_section(
            "VAE decode on a CPU: channel norm (tiny preset, 256x256)",
            lines,
            [
                f"median of {args.runs} decodes after a warm-up, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads; outputs in [-1, 1]"
            ],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
