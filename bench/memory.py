"""Benchmark: peak memory of one process with all five slugs resident (tiny preset).

    python bench/memory.py [--weights tiny] [--cache-dir DIR] [--quick] [--doc PATH | --no-write]
        [--json PATH]

Loads every slug into one Engine with room for all of them (four base pipelines: qwen-image
and qwen-image-fast share one), runs one request on each, and reports the process's peak
resident set size (and CUDA peak allocation where a GPU is used). Every run is already at its
smallest (2 steps): ``--quick`` changes nothing here (bench/report.py has the options every
benchmark shares).
"""

from __future__ import annotations

import argparse
import base64
import io
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import bench_args, publish, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="tiny")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temp dir)")
    args = bench_args(parser, {})

    from PIL import Image

    from qwenserve.catalog import ALL_MODELS, validate_request
    from qwenserve.runtime import Engine, EngineConfig

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        engine = Engine(EngineConfig(weights=args.weights, cache_dir=cache, resident_models=5))
        for spec in ALL_MODELS:
            body: dict[str, object] = {"prompt": "a red fox", "seed": 1}
            if spec.param("steps") is not None:
                body["steps"] = 2
            if spec.param("image") is not None:
                body["image"] = picture
            if spec.param("image_1") is not None:
                body["image_1"] = picture
            if spec.slug == "qwen-image-2512":
                body.update(width=256, height=256)
            request = validate_request(spec.slug, body)
            images = [Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")] * len(
                request.images
            )
            engine.generate(request, images=images)
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append([spec.slug, str(len(engine.resident())), f"{peak_mb:.0f}"])
        resident = engine.resident()
    lines = table(["after running", "resident bases", "peak RSS (MiB)"], rows)
    print("\n".join(lines))
    print("resident:", ", ".join(resident))
    publish(
        args,
        f"Peak memory with all five slugs resident ({args.weights} preset)",
        lines,
        [f"resident at the end: {', '.join(resident)}"],
        {
            "peak_rss_mib": {row[0]: float(row[2]) for row in rows},
            "resident": list(resident),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
