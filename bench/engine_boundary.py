"""Benchmark: the per-image cost of running the engine in its own process.

    python bench/engine_boundary.py [--runs 30] [--steps 8] [--cache-dir DIR]
        [--quick] [--doc PATH | --no-write] [--json PATH]

Side by side in one run, on the tiny preset (qwen-image-fast): the same requests through the
engine in this process (``runtime.Engine``, as ``ENGINE_PROCESS=false`` runs it) and through
``EngineProcess`` (the default: the engine in a spawned child, typed messages over a pipe, the
image once through a file in /dev/shm), runs alternating after a warm-up, a new seed each run;
median seconds per image and their ratio. Since a difference of medians on a busy machine is
noisy, the boundary is also timed alone: the same call (request in, one progress message per
step, the image out) to a child whose engine answers at once with an image of the same size;
and, in the real calls, what each cost beyond the engine's own timing of its pipeline call.
``--quick``: 2 runs of 2 steps (bench/report.py has the options every benchmark shares).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import bench_args, publish, table  # noqa: E402


class EchoEngine:
    """An engine that answers at once: ``size``² RGB noise after ``steps`` step reports, so a
    call to it through the boundary costs the boundary alone."""

    def __init__(self, config: dict[str, Any]) -> None:
        import numpy as np
        from PIL import Image

        size = int(config["size"])
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        self.image = Image.fromarray(pixels, "RGB")

    def describe(self) -> str:
        return "echo engine"

    def resident(self) -> list[str]:
        return []

    def batch_key(self, request: Any) -> Hashable | None:
        return None

    def generate(
        self,
        request: Any,
        *,
        images: Sequence[Any] = (),
        extra_loras: Sequence[Path] = (),
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Any:
        from qwenserve.runtime.config import GeneratedImage

        for step in range(request.steps):
            if on_step is not None:
                on_step(step + 1, request.steps)
            if should_cancel is not None and should_cancel():
                raise RuntimeError("cancelled")
        size = self.image.width
        return GeneratedImage(self.image.copy(), request.seed, size, size, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, help="tiny preset cache (default: a temp dir)")
    args = bench_args(parser, {"runs": 2, "steps": 2})

    from qwenserve.catalog import validate_request
    from qwenserve.runtime import Engine, EngineConfig
    from qwenserve.runtime.batch_keys import batch_key
    from qwenserve.worker.engine_child import EngineSpec
    from qwenserve.worker.engine_process import EngineProcess

    def request(seed: int) -> Any:
        body = {"prompt": "a lighthouse", "steps": args.steps, "seed": seed}
        return validate_request("qwen-image-fast", body)

    hooks: dict[str, Any] = {"on_step": lambda _d, _t: None, "should_cancel": lambda: False}
    with tempfile.TemporaryDirectory() as tmp:
        config = EngineConfig(weights="tiny", cache_dir=args.cache_dir or Path(tmp))
        local = Engine(config)
        spec = EngineSpec("qwenserve.runtime:Engine", config)
        child = EngineProcess(spec, batch_key=partial(batch_key, config=config)).start()
        try:
            engines: dict[str, Any] = {"in this process": local, "in a child process": child}
            times: dict[str, list[float]] = {name: [] for name in engines}
            outside: dict[str, list[float]] = {name: [] for name in engines}
            sizes: set[tuple[int, int]] = set()
            for run in range(args.runs + 1):  # the first run warms up
                order = list(engines.items())
                for name, engine in order if run % 2 else order[::-1]:  # each first as often
                    started = time.perf_counter()
                    out = engine.generate(request(run), **hooks)
                    if run:
                        times[name].append(time.perf_counter() - started)
                        # What the call cost beyond the engine's own timing of its pipeline
                        # call (measured where the engine runs): load-proof, unlike the totals.
                        outside[name].append(times[name][-1] - out.inference_time_s)
                    sizes.add((out.width, out.height))
            side = max(sizes)[0]
            echo_spec = EngineSpec(
                "bench.engine_boundary:EchoEngine", {"size": side}, count_tokens=False
            )
            echo = EngineProcess(echo_spec, batch_key=lambda _r: None).start()
            boundary: list[float] = []
            for run in range(max(args.runs, 5) * 10 + 1):
                started = time.perf_counter()
                echo.generate(request(run), **hooks)
                if run:
                    boundary.append(time.perf_counter() - started)
            echo.close()
        finally:
            child.close()
    local_s = statistics.median(times["in this process"])
    child_s = statistics.median(times["in a child process"])
    local_min_s, child_min_s = min(times["in this process"]), min(times["in a child process"])
    boundary_ms = statistics.median(boundary) * 1000
    local_out_ms = statistics.median(outside["in this process"]) * 1000
    child_out_ms = statistics.median(outside["in a child process"]) * 1000
    added_ms = child_out_ms - local_out_ms
    # Against the fastest in-process image: the least a tiny image costs here, so the share
    # is not shrunk by whatever else the machine was doing.
    boundary_pct = boundary_ms / 1000 / local_min_s * 100
    width, height = max(sizes)
    rows = [
        [
            "in this process",
            f"{local_s * 1000:.1f}",
            "1.000",
            f"{local_min_s * 1000:.1f}",
            "1.000",
            f"{local_out_ms:.2f}",
        ],
        [
            "in a child process",
            f"{child_s * 1000:.1f}",
            f"{child_s / local_s:.3f}",
            f"{child_min_s * 1000:.1f}",
            f"{child_min_s / local_min_s:.3f}",
            f"{child_out_ms:.2f}",
        ],
    ]
    header = [
        "engine",
        "ms per image (median)",
        "ratio",
        "fastest (ms)",
        "ratio",
        "ms outside the pipeline call (median)",
    ]
    lines = table(header, rows)
    lines += [
        "",
        f"In these calls the child added **{added_ms:.2f} ms per image** outside the pipeline "
        f"call, {added_ms / 10 / local_min_s:.2f} % of the fastest image in this process (the "
        "engine times its call where it runs, so this difference hardly moves with the "
        "machine's load, unlike the totals).",
        "",
        f"The boundary alone (a child that answers at once, {args.steps} step messages and a "
        f"{width}x{height} image back): **{boundary_ms:.2f} ms per image, "
        f"{boundary_pct:.2f} % of the fastest tiny-preset image in this process** (goal: at most "
        "2 %).",
    ]
    print("\n".join(lines))
    publish(
        args,
        f"The engine's process boundary (tiny preset, qwen-image-fast {width}x{height}, "
        f"{args.steps} steps)",
        lines,
        [
            f"{args.runs} alternating runs after a warm-up (each engine first in half of them), a "
            f"new seed each run; the boundary alone: median of {len(boundary)} calls. On a shared "
            "machine the two medians move by more than the boundary costs (the in-process engine "
            "and the child each keep torch's threads): read the time added outside the pipeline "
            "call and the boundary alone"
        ],
        {
            "inprocess_s": local_s,
            "child_s": child_s,
            "ratio": child_s / local_s,
            "inprocess_outside_ms": local_out_ms,
            "child_outside_ms": child_out_ms,
            "added_ms": added_ms,
            "inprocess_min_s": local_min_s,
            "child_min_s": child_min_s,
            "min_ratio": child_min_s / local_min_s,
            "boundary_ms": boundary_ms,
            "boundary_pct": boundary_pct,
            "width": width,
            "height": height,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
