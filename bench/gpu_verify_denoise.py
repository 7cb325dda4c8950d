"""bench/gpu_verify.py's denoising stages on the shared engine: qwen-image with true CFG (pairing
on and off, attention kernels), qwen-image-fast (Lightning unfused, then fused), the VAE's decode
memory per pixel and a batch of 4 against 4 single calls."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from bench.gpu_verify_measure import (
    cfg_pairing,
    flop_fields,
    label,
    request_for,
    timed,
)
from bench.gpu_verify_measure import version as _version
from bench.gpu_verify_run import GIB, Run, Stage, error_text, free_memory
from bench.step_timing import StepClock

FAST_TARGET_S_PER_IMAGE = 1.2
"""The issue's target for an 8-step Lightning image."""
CFG_GUIDANCE = 4.0


# --- qwen-image, true CFG: pairing on and off on one engine, attention backends -------------
def stage_cfg(run: Run, stage: Stage) -> None:
    """Each (size, steps) case twice on the shared engine, CFG pairing on then off: the rows
    differ in ``transformer_calls_per_step`` (1 paired, 2 not) and ``paired_calls``."""
    plan = run.plan
    record = stage.record
    record["slug"], record["guidance"] = "qwen-image", CFG_GUIDANCE
    record["attention"] = {"available": attention_backends(run)}
    engine = run.engine()
    last_s = 0.0
    for size, steps in plan.cfg_cases:
        request = request_for("qwen-image", size, steps, guidance=CFG_GUIDANCE)
        transformer = engine.prepare_call(request).pipeline.transformer
        for on in (True, False):

            def measure(
                request: Any = request, on: bool = on, transformer: Any = transformer
            ) -> dict[str, Any]:
                with cfg_pairing(transformer, on) as batcher:
                    before = batcher.batched_calls
                    row = {"cfg_batch": on, **timed(run, engine, request)}
                    row["paired_calls"] = batcher.batched_calls - before
                return row

            name = f"{label(size)} {steps} steps cfg_batch={'on' if on else 'off'}"
            row = stage.attempt(name, measure, last_s * 0.5)
            last_s = row["wall_s"] if row else last_s
    size = plan.cfg_cases[0][0]
    first = request_for("qwen-image", size, 2, guidance=CFG_GUIDANCE)
    transformer = engine.prepare_call(first).pipeline.transformer
    for on in (True, False):
        try:
            with cfg_pairing(transformer, on):
                ops = sdpa_ops(run, engine, first)
        except RuntimeError as error:
            ops = error_text(error)
        record["attention"][f"sdpa_ops_cfg_batch_{'on' if on else 'off'}"] = ops


def attention_backends(run: Run) -> dict[str, Any]:
    """What attention can run here: torch's SDPA switches and diffusers' backends whose
    requirements are met (a backend whose check raises is not usable)."""
    torch = run.torch
    found: dict[str, Any] = {
        "sdpa_flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "sdpa_mem_efficient_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "sdpa_cudnn_enabled": torch.backends.cuda.cudnn_sdp_enabled(),
        "sdpa_math_enabled": torch.backends.cuda.math_sdp_enabled(),
        "packages": {
            name: _version(name)
            for name in ("flash-attn", "flash-attn-3", "sageattention", "xformers", "kernels")
            if _version(name)
        },
    }
    try:
        from diffusers.models import attention_dispatch as dispatch

        usable = []
        for backend in dispatch.AttentionBackendName:
            try:
                dispatch._check_attention_backend_requirements(backend)
            except Exception:
                continue
            usable.append(backend.value)
        found["diffusers_usable"] = usable
    except Exception as error:  # private API: report, do not fail the stage
        found["diffusers_usable"] = error_text(error)
    return found


def sdpa_ops(run: Run, engine: Any, request: Any) -> dict[str, int] | str:
    """Which aten attention kernels one 2-step call ran (flash, efficient, cuDNN or math),
    from the profiler: the CFG pair's explicit mask keeps SDPA off the flash kernel."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            engine.generate(request)
    except Exception as error:
        return error_text(error)
    ops: dict[str, int] = {}
    for event in profiler.key_averages():
        if re.search(r"scaled_dot_product|flash_attention|efficient_attention", event.key):
            ops[event.key] = int(event.count)
    return ops


# --- qwen-image-fast: Lightning unfused (shared engine), then fused ---------------------------
def stage_fast(run: Run, stage: Stage) -> None:
    """Unfused on the shared engine; fused on a second engine (the shared one released first
    only where both do not fit: this is the last stage of the core command that uses it)."""
    plan = run.plan
    record = stage.record
    record["slug"], record["target_s_per_image"] = "qwen-image-fast", FAST_TARGET_S_PER_IMAGE
    build_s = float(run.results.get("build", {}).get("build_s") or 0.0)
    for fused in (False, True):
        if fused and stage.left() <= build_s:
            record.setdefault("not_run", []).append("fused: stage budget")
            continue
        started = time.perf_counter()
        engine = run.other_engine(fuse_lightning=True) if fused else run.engine()
        engine.load("qwen-image-fast")  # loads (and for fused, fuses) the Lightning LoRA
        record[f"load_s_{'fused' if fused else 'unfused'}"] = time.perf_counter() - started
        for size in plan.fast_sizes:
            request = request_for("qwen-image-fast", size, plan.fast_steps)

            def measure(
                request: Any = request, engine: Any = engine, fused: bool = fused
            ) -> dict[str, Any]:
                row = {"fused": fused, **timed(run, engine, request)}
                row["meets_target"] = row["s_per_image"] <= FAST_TARGET_S_PER_IMAGE
                return row

            stage.attempt(f"{label(size)} {'fused' if fused else 'unfused'}", measure)
        del engine
    free_memory()


# --- VAE decode peak memory per pixel --------------------------------------------------------
def runtime_decode_figure(device_type: str, dtype_bytes: int) -> dict[str, Any]:
    """The runtime's decode peak per pixel for this device and dtype, and where it comes
    from (``memory_plan.decode_bytes_per_pixel``)."""
    try:
        from qwenserve.runtime.memory_plan import decode_bytes_per_pixel

        figure = decode_bytes_per_pixel(device_type, dtype_bytes)
    except (ImportError, AttributeError) as error:  # moved by a later runtime: say so
        return {"runtime_bytes_per_pixel": None, "runtime_source": error_text(error)}
    return {"runtime_bytes_per_pixel": figure.bytes_per_pixel, "runtime_source": figure.source}


def stage_vae(run: Run, stage: Stage) -> None:
    """Decodes random latents with the pipeline's own VAE (``pipe.vae.decode``, as the pipeline
    calls it): peak memory above the model, per image and per output pixel, next to the
    runtime's figure for this device and dtype (on CUDA a CPU fp32 measurement scaled, until
    ``measured_bytes_per_pixel`` here replaces it)."""
    torch = run.torch
    record = stage.record
    record["sizes"] = [label(size) for size in run.plan.vae_sizes]
    vae = run.engine().prepare_call(request_for("qwen-image", (256, 256), 2)).pipeline.vae
    record["dtype"] = str(vae.dtype).removeprefix("torch.")
    record.update(runtime_decode_figure(vae.device.type, vae.dtype.itemsize))
    record["memory_measured"] = run.cuda
    for width, height in run.plan.vae_sizes:
        for batch in (1, 4):
            for tiled in (False, True):

                def measure(
                    batch: int = batch,
                    tiled: bool = tiled,
                    width: int = width,
                    height: int = height,
                ) -> dict[str, Any]:
                    latents = torch.randn(
                        batch,
                        vae.config.z_dim,
                        1,
                        height // 8,
                        width // 8,
                        dtype=vae.dtype,
                        device=vae.device,
                    )
                    (vae.enable_tiling if tiled else vae.disable_tiling)()
                    free_memory()
                    base = torch.cuda.memory_allocated() if run.cuda else 0
                    run.sync()
                    started = time.perf_counter()
                    with torch.no_grad():
                        vae.decode(latents, return_dict=False)
                    run.sync()
                    row: dict[str, Any] = {
                        "batch": batch,
                        "tiled": tiled,
                        "decode_s": time.perf_counter() - started,
                    }
                    if run.cuda:
                        peak = torch.cuda.max_memory_allocated() - base
                        row["peak_gib"] = peak / GIB
                        row["peak_gib_per_image"] = row["peak_gib"] / batch
                        row["bytes_per_pixel"] = peak / (batch * width * height)
                    else:
                        row["peak_gib"] = None
                    return row

                name = f"{label((width, height))} batch {batch} {'tiled' if tiled else 'untiled'}"
                stage.attempt(name, measure)
    vae.disable_tiling()  # the engine sets tiling per call again
    untiled = [
        row["bytes_per_pixel"]
        for row in record.get("runs", [])
        if not row.get("tiled") and "bytes_per_pixel" in row
    ]
    record["measured_bytes_per_pixel"] = max(untiled) if untiled else None


# --- a batch of 4 against 4 single calls -----------------------------------------------------
def stage_batch(run: Run, stage: Stage) -> None:
    plan = run.plan
    engine = run.engine()
    stage.record["slug"], stage.record["batch"] = "qwen-image-fast", plan.batch
    last_s = 0.0
    for size in plan.batch_sizes:
        requests = [
            dataclasses.replace(request_for("qwen-image-fast", size, plan.fast_steps), seed=seed)
            for seed in range(1, plan.batch + 1)
        ]

        def measure(requests: list[Any] = requests) -> dict[str, Any]:
            engine.generate(dataclasses.replace(requests[0], steps=2))
            engine.generate_batch([dataclasses.replace(r, steps=2) for r in requests])
            run.sync()
            started = time.perf_counter()
            for request in requests:
                engine.generate(request)
            run.sync()
            singles_s = time.perf_counter() - started
            clock = StepClock(run.sync)
            started = clock.start()
            engine.generate_batch(requests, on_step=clock)
            run.sync()
            batch_s = time.perf_counter() - started
            s_per_step = clock.median_step_s()
            return {
                "steps": plan.fast_steps,
                "singles_s": singles_s,
                "batch_s": batch_s,
                "speedup": singles_s / batch_s,
                "s_per_step_batched": s_per_step,
                **flop_fields(run, engine, requests[0], s_per_step, batch=plan.batch),
            }

        row = stage.attempt(f"{label(size)} batch of {plan.batch}", measure, last_s)
        last_s = row["wall_s"] if row else last_s
