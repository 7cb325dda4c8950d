"""Benchmark: the tiny preset's VAE decode on a CPU, diffusers' channel norm versus ours.

    python bench/cpu_vae_norm.py [--runs 5] [--batches 1,8] [--cache-dir DIR] [--quick]
        [--doc PATH | --no-write] [--json PATH]

Decodes 32x32 latents (a 256x256 image) at batch 1 and 8 with the tiny preset's VAE, first as
diffusers ships it (``F.normalize`` over the channel dimension), then after
``qwenserve.runtime.cpu_kernels.use_fast_vae_norms``; median times and the largest difference
between the two outputs. ``--quick``: one decode each at batch 1 and 2 (bench/report.py has the
options every benchmark shares).
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

from bench.report import bench_args, publish, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    args = bench_args(parser, {"runs": 1, "batches": "1,2"})

    import torch
    from diffusers import AutoencoderKLQwenImage

    from qwenserve.catalog import PipelineKind
    from qwenserve.runtime.cpu_kernels import use_fast_vae_norms
    from qwenserve.runtime.tiny_preset import ensure_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        base = ensure_tiny_base(cache, "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
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

    sizes = [int(b) for b in args.batches.split(",")]
    batches = {size: torch.randn(size, 16, 1, 32, 32) for size in sizes}
    stock = {size: median_s(latents) for size, latents in batches.items()}
    use_fast_vae_norms(vae)
    fast = {size: median_s(latents) for size, latents in batches.items()}
    rows = []
    figures = {}
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
        figures[f"batch {size}"] = {
            "diffusers_s": stock_s,
            "qwenserve_s": fast_s,
            "max_abs_difference": difference,
        }
    lines = table(
        ["batch", "diffusers norm (ms)", "qwenserve norm (ms)", "speed-up", "max abs difference"],
        rows,
    )
    print("\n".join(lines))
    publish(
        args,
        "VAE decode on a CPU: channel norm (tiny preset, 256x256)",
        lines,
        [
            f"median of {args.runs} decodes after a warm-up, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; outputs in [-1, 1]"
        ],
        figures,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
