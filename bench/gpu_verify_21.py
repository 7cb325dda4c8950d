"""bench/gpu_verify.py's Qwen-Image 2.1 stage: the 7.1B model at 1024², 40 steps (random-full).

Text-to-image (SGLang's anchor: 4.48 s on an H200), an edit with two references (the prefix KV
cache then holds their tokens) and the fast slug at its catalog default steps: seconds per step
and per image, the device's peak memory, and the memory plan's prefix KV cache estimate for the
call next to it. Both slugs go through the catalog, so the stage follows whatever base and
checkpoint they resolve to (the fast slug's ``base_weights`` is recorded). The dry run does the
same on the tiny preset at a small size and 2 steps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bench.step_timing import StepClock

SLUG = "qwen-image-2.1"
FAST_SLUG = "qwen-image-2.1-fast"
GIB = 2**30


def references(size: tuple[int, int], count: int) -> list[Any]:
    """Noise references of ``size`` (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(21)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")
        for _ in range(count)
    ]


def _timed_21(run: Any, engine: Any, request: Any, images: list[Any]) -> dict[str, Any]:
    """One warmed-up 2.1 request: seconds per step and per image, peak memory, KV estimate."""
    from qwenserve.runtime.call import prefix_cache_bytes

    if run.plan.warm_up:
        engine.generate(dataclasses.replace(request, steps=2), images=images)
    if run.cuda:
        run.torch.cuda.reset_peak_memory_stats()
    clock = StepClock(run.sync)
    started = clock.start()
    engine.generate(request, images=images, on_step=clock)
    run.sync()
    s_per_image = time.perf_counter() - started
    prepared = engine.prepare_call(request, images)
    kv_bytes = prefix_cache_bytes(prepared.pipeline, prepared.kwargs, images, 1)
    return {
        "steps": request.steps,
        "size": [prepared.size.width, prepared.size.height],
        "references": len(images),
        "s_per_step": clock.median_step_s(),
        "s_per_image": s_per_image,
        "kv_cache_estimate_gib": kv_bytes / GIB,
        **run.memory(),
    }


def stage_qwen21(run: Any, stage: Any) -> None:
    """Load 2.1 (after the shared 20B engine is released: one model at a time), then time
    text-to-image and a two-reference edit at the plan's size and steps, and the fast slug at
    its own default steps (a base of its own loads in place of 2.1's: one resident model)."""
    from bench.gpu_verify_measure import request_for
    from qwenserve.catalog import get_model

    plan = run.plan
    size, steps = plan.q21_size, plan.q21_steps
    record = stage.record
    record["slug"], record["size"], record["steps"] = SLUG, list(size), steps
    record["base_weights"] = {s: get_model(s).recipe.base_weights for s in (SLUG, FAST_SLUG)}
    run.release_shared()
    started = time.perf_counter()
    engine = run.other_engine()
    engine.load(SLUG)
    run.sync()
    record["load_s"] = time.perf_counter() - started
    record.update({f"loaded_{k}": v for k, v in run.memory().items()})
    cases = (
        ("text-to-image", SLUG, steps, 0),
        ("edit, 2 references", SLUG, steps, 2),
        ("fast, default steps", FAST_SLUG, None, 0),
    )
    last_s = 0.0
    for name, slug, case_steps, count in cases:
        request = request_for(slug, size, case_steps)
        images = references(size, count)

        def measure(
            request: Any = request, images: list[Any] = images, engine: Any = engine
        ) -> dict[str, Any]:
            started = time.perf_counter()
            engine.load(request.slug)  # the fast slug's own base, if it has one
            run.sync()
            load_s = time.perf_counter() - started
            return {
                "slug": request.slug,
                "load_s": load_s,
                **_timed_21(run, engine, request, images),
            }

        row = stage.attempt(f"{name} {size[0]}x{size[1]}", measure, last_s * 0.5)
        last_s = row["wall_s"] if row else last_s
    del engine
