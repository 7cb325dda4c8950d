"""bench/gpu_verify.py's real-size text encoders and edit: what random-full's narrow encoder hides.

- encoders: Qwen2.5-VL-7B (Qwen-Image) and Qwen3-VL-8B (2.1) built with random weights straight
  on the device (``runtime/random_full_encoders.py``): build time, bytes, and the time to encode
  a long prompt alone and with its negative (CFG), as the pipelines call them; and what sharing
  one encoder and VAE between two bases saves.
- edit: the edit-plus pipeline (Qwen-Image-Edit-2509's layout; the catalog has no Edit-2511)
  at its real size with the 7B encoder swapped in, two 1024² references, 40 steps, true CFG:
  the path SGLang's 38.63 s (one H100) is measured on, vision tower and prompt encoding included.

The dry run does the same with the tiny preset's encoders at small sizes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bench.gpu_verify_21 import references
from bench.gpu_verify_core import module_bytes
from bench.gpu_verify_measure import PROMPT, label, request_for, timed
from bench.gpu_verify_run import GIB, Run, Stage, free_memory

EDIT_SLUG = "qwen-image-edit-plus-product-photography"
EDIT_LAYOUT = "Qwen-Image-Edit-2509 (edit-plus pipeline; the catalog has no Edit-2511)"
EDIT_REFERENCES = 2
CFG_GUIDANCE = 4.0


def _device_and_dtype(run: Run) -> tuple[Any, Any]:
    torch = run.torch
    if run.cuda:
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _prompt_ids(tokens: int, batch: int, device: Any) -> Any:
    """``batch`` copies of a prompt of exactly ``tokens`` local-tokenizer ids (no special ids)."""
    import torch

    from qwenserve.runtime.tiny_preset import prompt_templates
    from qwenserve.runtime.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(prompt_templates())
    ids: list[int] = list(tokenizer(PROMPT)["input_ids"])
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    return torch.tensor([ids] * batch, device=device)


def stage_encoders(run: Run, stage: Stage) -> None:
    """Each full-size text encoder alone on the device: build, bytes, encode time."""
    from qwenserve.catalog import PipelineKind
    from qwenserve.runtime.random_full_encoders import ENCODER_NAMES, random_text_encoder

    torch = run.torch
    plan = run.plan
    record = stage.record
    record["full_size"], record["tokens"] = plan.full_encoders, plan.encoder_tokens
    run.release_shared()
    device, dtype = _device_and_dtype(run)
    for kind, name in ENCODER_NAMES.items():

        def measure(kind: PipelineKind = kind) -> dict[str, Any]:
            free_memory()
            started = time.perf_counter()
            encoder = random_text_encoder(kind, device, dtype, full=plan.full_encoders)
            run.sync()
            row: dict[str, Any] = {
                "build_s": time.perf_counter() - started,
                "parameters_b": sum(p.numel() for p in encoder.parameters()) / 1e9,
                "gib": module_bytes(encoder) / GIB,
            }
            for batch, key in ((1, "encode_s"), (2, "encode_s_with_negative")):
                ids = _prompt_ids(plan.encoder_tokens, batch, device)
                with torch.no_grad():
                    encoder(input_ids=ids, output_hidden_states=True)  # warm-up
                    run.sync()
                    started = time.perf_counter()
                    hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
                    run.sync()
                row[key] = time.perf_counter() - started
                row["finite"] = bool(torch.isfinite(hidden).all())
            row["width"] = int(hidden.shape[-1])
            row.update(run.memory())
            del encoder, hidden
            free_memory()
            return row

        stage.attempt(name, measure)
    encoders = {row["label"]: row["gib"] for row in record.get("runs", []) if "gib" in row}
    vae_gib = (run.results.get("build", {}).get("component_gib") or {}).get("vae")
    if encoders:
        qwen_image = encoders.get(ENCODER_NAMES[PipelineKind.TEXT_TO_IMAGE])
        record["sharing"] = {
            "note": "what one more Qwen-Image base (edit, 2512) costs less when it shares the"
            " text encoder and VAE (measured sizes)",
            "encoder_gib": qwen_image,
            "vae_gib": vae_gib,
            "saved_per_extra_base_gib": (qwen_image or 0.0) + (vae_gib or 0.0),
        }


def stage_edit(run: Run, stage: Stage) -> None:
    """The edit-plus pipeline at its real size with the 7B encoder, 2 references, CFG."""
    from qwenserve.catalog import PipelineKind
    from qwenserve.runtime.random_full_encoders import random_text_encoder

    plan = run.plan
    size, steps = plan.edit_size, plan.edit_steps
    record = stage.record
    record.update(slug=EDIT_SLUG, layout=EDIT_LAYOUT, references=EDIT_REFERENCES)
    record.update(size=label(size), steps=steps, guidance=CFG_GUIDANCE, lightning="fused")
    run.release_shared()
    started = time.perf_counter()
    # Lightning fused: each step is a plain 20B forward, as in the anchor (no adapter layers).
    engine = run.other_engine(fuse_lightning=True, cfg_batch=False)
    # The contract wants image fields (references by URL); the pixels are passed to the call.
    fields = {f"image_{n}": f"https://example.com/{n}.png" for n in range(1, EDIT_REFERENCES + 1)}
    request = request_for(EDIT_SLUG, size, None, **fields)
    request = dataclasses.replace(request, steps=steps, guidance=CFG_GUIDANCE, lora=None)
    images = references(size, EDIT_REFERENCES)
    pipe = engine.prepare_call(request, images).pipeline
    record["load_s"] = time.perf_counter() - started
    device, _dtype = _device_and_dtype(run)
    started = time.perf_counter()
    pipe.text_encoder = random_text_encoder(
        PipelineKind.EDIT_PLUS, device, pipe.transformer.dtype, full=plan.full_encoders
    )
    free_memory()  # the narrow encoder it replaced
    run.sync()
    record["encoder_build_s"] = time.perf_counter() - started
    record["encoder_gib"] = module_bytes(pipe.text_encoder) / GIB
    record.update({f"loaded_{k}": v for k, v in run.memory().items()})

    def measure(engine: Any = engine) -> dict[str, Any]:
        if run.cuda:
            run.torch.cuda.reset_peak_memory_stats()
        row = timed(run, engine, request, images=images)
        row["outside_steps_s"] = row["s_per_image"] - row["s_per_step"] * steps
        row.update(run.memory())
        return row

    stage.attempt(f"{label(size)}, {EDIT_REFERENCES} references, {steps} steps, CFG", measure)
    del pipe, engine
