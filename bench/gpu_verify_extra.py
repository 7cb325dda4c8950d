"""bench/gpu_verify.py's second command: compile (first, so it is never starved), the fp8 modes,
the full-size text encoders and a real-size edit. None of them uses the shared bf16 engine:
each builds what it measures and frees it."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.gpu_verify_measure import LONG_PROMPT, label, request_for, timed
from bench.gpu_verify_run import Run, Stage, free_memory

QUANTIZE_MODES = ("fp8-memory", "fp8-speed")
"""The fp8 modes the fp8 stage measures, each on its own engine ("fp8" is an alias of
"fp8-memory": measured once)."""
CFG_GUIDANCE = 4.0


# --- fp8 modes -------------------------------------------------------------------------------
@contextmanager
def timing_fast_paths(seconds: list[float]) -> Iterator[None]:
    """Times ``apply_fast_paths`` (where fp8 quantisation happens) by wrapping the name
    ``runtime/resident.py`` calls it by: the engine times only whole loads."""
    from qwenserve.runtime import resident as engine_module

    original = getattr(engine_module, "apply_fast_paths", None)
    if original is None:  # moved by a later engine: no split of the load time then
        yield
        return

    def timed_apply(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.synchronize()
            seconds.append(time.perf_counter() - started)

    setattr(engine_module, "apply_fast_paths", timed_apply)  # noqa: B010 (not exported)
    try:
        yield
    finally:
        setattr(engine_module, "apply_fast_paths", original)  # noqa: B010


def stage_fp8(run: Run, stage: Stage) -> None:
    """Each mode on its own engine: load time, the part of it spent quantising
    (``quantize_s``: the engine's fast-path step), memory, and seconds per step of qwen-image
    with CFG (pairing off, as on CUDA by default) against bf16's (the cfg stage's row of the
    same size, pairing off: this run's or ``--after``'s)."""
    from qwenserve.errors import InferenceError
    from qwenserve.runtime import Engine

    plan = run.plan
    record = stage.record
    record["modes"] = list(QUANTIZE_MODES)
    run.release_shared()
    reference = next(
        (
            row
            for row in run.results.get("cfg", {}).get("runs", [])
            if row.get("cfg_batch") is False and row["label"].startswith(label(plan.fp8_size))
        ),
        None,
    )
    record["bf16_s_per_step"] = (reference or {}).get("s_per_step")
    record["bf16_gpu_allocated_gib"] = run.results.get("build", {}).get("gpu_allocated_gib")
    request = request_for("qwen-image", plan.fp8_size, plan.fp8_steps, guidance=CFG_GUIDANCE)
    last_s = 0.0
    for mode in QUANTIZE_MODES:

        def measure(mode: str = mode) -> dict[str, Any]:
            try:
                engine = Engine(run.engine_config(quantize=mode, cfg_batch=False))
            except InferenceError as error:  # the engine's check of its switches
                return {"mode": mode, "refused": error.message}
            free_memory()
            quantize_s: list[float] = []
            started = time.perf_counter()
            with timing_fast_paths(quantize_s):
                engine.load("qwen-image")
            run.sync()
            load_s = time.perf_counter() - started
            row: dict[str, Any] = {"mode": mode, "load_s": load_s, **run.memory()}
            row["quantize_s"] = sum(quantize_s) if quantize_s else None
            row.update(timed(run, engine, request))
            if record["bf16_s_per_step"]:
                row["speedup_vs_bf16"] = record["bf16_s_per_step"] / row["s_per_step"]
            del engine
            free_memory()
            return row

        row = stage.attempt(mode, measure, last_s)
        if row and "load_s" in row:
            last_s = row["wall_s"]


# --- compile ---------------------------------------------------------------------------------
def graphs_compiled(engine: Any) -> dict[str, Any]:
    """Compile counts now: dynamo's graph and frame counters, and the engine's own counts
    (``Engine.compile_counts()``: compiles, recompiles, eager fallbacks) when it has them."""
    from torch._dynamo.utils import counters

    found: dict[str, Any] = {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "frames_compiled": int(counters["frames"].get("ok", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        # A warm-up is cold only without hits here (inductor caches graphs on disk).
        "fxgraph_cache_hits": int(counters["inductor"].get("fxgraph_cache_hit", 0)),
    }
    counts = getattr(engine, "compile_counts", None)
    if callable(counts):
        for name, value in counts().items():
            found[f"engine.{name}"] = int(value)
    return found


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {key: after[key] - before.get(key, 0) for key in after}


def stage_compile(run: Run, stage: Stage) -> None:
    plan = run.plan
    record = stage.record
    record["slug"] = "qwen-image-fast"
    record["backend"] = plan.compile_backend or "inductor"
    run.release_shared()
    engine = run.other_engine(compile=True)
    with compile_backend(plan.compile_backend):
        _compile_cases(run, stage, engine)
    del engine


def _compile_cases(run: Run, stage: Stage, engine: Any) -> None:
    plan = run.plan
    record = stage.record
    before = graphs_compiled(engine)
    started = time.perf_counter()
    record["running"] = "warm-up: build, then compile at the slug's default (1:1) size"
    engine.warm_up(["qwen-image-fast"])
    run.sync()
    del record["running"]
    record["warm_up_s"] = time.perf_counter() - started
    record["warm_up_compiles"] = _delta(before, graphs_compiled(engine))
    record["counter_source"] = (
        "engine" if any(k.startswith("engine.") for k in before) else "torch._dynamo counters"
    )
    from qwenserve.catalog import validate_request

    default = validate_request(
        "qwen-image-fast", {"prompt": "warm-up", "steps": plan.fast_steps, "seed": 2}
    )
    size = engine.output_size(default, [])
    record["warm_up_size"] = label(size)
    cases = [
        ("steady (warm-up prompt and size)", default),
        ("new prompt length", dataclasses.replace(default, prompt=LONG_PROMPT)),
        (
            f"new size {label(plan.fast_sizes[0])}",
            dataclasses.replace(default, width=plan.fast_sizes[0][0], height=plan.fast_sizes[0][1]),
        ),
    ]
    for name, request in cases:

        def measure(request: Any = request, engine: Any = engine) -> dict[str, Any]:
            before = graphs_compiled(engine)
            started = time.perf_counter()
            engine.generate(request)  # the first call pays any recompilation
            run.sync()
            first_s = time.perf_counter() - started
            compiles = _delta(before, graphs_compiled(engine))
            steady = timed(run, engine, request, warm=False)
            return {
                "first_call_s": first_s,
                "compiles": compiles,
                "recompiled": compiles["unique_graphs"] > 0 or compiles["frames_compiled"] > 0,
                "ran_eager": compiles.get("engine.eager_fallbacks", 0) > 0,
                **steady,
            }

        stage.attempt(name, measure)
    eager = {
        row["label"]: row.get("s_per_step")
        for row in run.results.get("fast", {}).get("runs", [])
        if not row.get("fused")
    }
    record["eager_s_per_step_same_size"] = eager.get(f"{label(size)} unfused")


@contextmanager
def compile_backend(backend: str | None) -> Iterator[None]:
    """torch.compile's backend for the modules compiled inside (None: its default, inductor).

    The dry run's way to prove the stage in seconds: diffusers compiles each repeated block
    with ``module.compile(...)``, and inductor's C++ code generation takes minutes on a CPU."""
    if backend is None:
        yield
        return
    import torch

    original = torch.nn.Module.compile

    def with_backend(module: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", backend)
        return original(module, *args, **kwargs)

    torch.nn.Module.compile = with_backend  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.compile = original  # type: ignore[method-assign]
