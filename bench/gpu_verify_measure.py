"""bench/gpu_verify.py's measuring helpers: requests at exact sizes, timed calls with their FLOP
limit, transformer calls counted, and CFG pairing switched on the one shared engine."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from bench.gpu_verify_run import Run, Size
from bench.step_timing import StepClock, TransformerShape, image_tokens

SPEC_PEAK_TFLOPS = 790.0
"""Dense bf16 TFLOP/s an H100/H200 achieves in practice (gpu-facts.md): the second yardstick."""
PROMPT = "a lighthouse on a cliff at dusk, waves below, oil painting"
LONG_PROMPT = PROMPT + (
    ", seen from the sea through light rain, a fishing boat in the foreground, gulls, warm light"
    " in the lantern room, dramatic clouds, a path winding up the cliff, grass bent by the wind"
)


def label(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def request_for(slug: str, size: Size, steps: int | None, **body: Any) -> Any:
    """A request validated as the API would (``steps`` None: the catalog's default for the
    slug), then set to exactly ``size`` (the public contract takes an aspect ratio; the
    benchmark needs exact sizes)."""
    from qwenserve.catalog import validate_request

    fields: dict[str, Any] = {"prompt": PROMPT, "seed": 1, **body}
    if steps is not None:
        fields["steps"] = steps
    request = validate_request(slug, fields)
    return dataclasses.replace(request, width=size[0], height=size[1], aspect_ratio=None)


def flop_fields(
    run: Run, engine: Any, request: Any, s_per_step: float, batch: int = 1, images: Any = ()
) -> dict[str, Any]:
    """The step's FLOPs (from the tokens this exact call uses) and its share of the peaks."""
    prepared = engine.prepare_call(request, images) if images else engine.prepare_call(request)
    shape = TransformerShape.of(prepared.pipeline.transformer)
    image = image_tokens(prepared.size.generate_width, prepared.size.generate_height)
    embeds = prepared.kwargs.get("prompt_embeds")
    texts = [embeds.shape[1]] if embeds is not None else []
    negative = prepared.kwargs.get("negative_prompt_embeds")
    if prepared.kwargs.get("true_cfg_scale", 1.0) > 1.0 and negative is not None:
        texts.append(negative.shape[1])
    if not texts:  # edit pipelines encode inside the call: no FLOP count here
        return {"image_tokens": image}
    flop = batch * sum(shape.forward_flop(image, text) for text in texts)
    fields: dict[str, Any] = {
        "image_tokens": image,
        "text_tokens": texts,
        "forwards_per_step": batch * len(texts),
        "tflop_per_step": flop / 1e12,
        "share_of_spec": flop / (SPEC_PEAK_TFLOPS * 1e12) / s_per_step,
    }
    if run.peak_flops:
        fields["limit_s_per_step"] = flop / run.peak_flops
        fields["share_of_peak"] = flop / run.peak_flops / s_per_step
    return fields


class TransformerCalls:
    """Counts the transformer's real executions (its first block's calls), so a row shows
    whether CFG's two passes ran as one paired call or two: wrappers of ``forward`` (the CFG
    batcher) are counted through, not as calls."""

    def __init__(self, transformer: Any) -> None:
        blocks = getattr(transformer, "transformer_blocks", None)
        self._module = blocks[0] if blocks else transformer
        self.calls = 0
        self.rows = 0

    def _count(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls += 1
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.rows += int(hidden.shape[0]) if hidden is not None else 0

    @contextmanager
    def counting(self) -> Iterator[TransformerCalls]:
        self.calls = self.rows = 0
        handle = self._module.register_forward_pre_hook(self._count, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def timed(
    run: Run, engine: Any, request: Any, *, warm: bool = True, images: Any = ()
) -> dict[str, Any]:
    """One warmed-up request: median seconds per step and per image, the transformer calls
    per step (1 with CFG paired, 2 unpaired), and the FLOP limit."""
    kwargs: dict[str, Any] = {"images": images} if images else {}
    if warm and run.plan.warm_up:
        engine.generate(dataclasses.replace(request, steps=2), **kwargs)
    prepared = engine.prepare_call(request, images) if images else engine.prepare_call(request)
    calls = TransformerCalls(prepared.pipeline.transformer)
    per_step: list[float] = []
    per_image: list[float] = []
    with calls.counting():
        for _ in range(run.runs):
            clock = StepClock(run.sync)
            started = clock.start()
            engine.generate(request, on_step=clock, **kwargs)
            run.sync()
            per_image.append(time.perf_counter() - started)
            per_step.append(clock.median_step_s())
    s_per_step = sorted(per_step)[len(per_step) // 2]
    steps = request.steps * run.runs
    return {
        "steps": request.steps,
        "s_per_step": s_per_step,
        "s_per_image": sorted(per_image)[len(per_image) // 2],
        "transformer_calls_per_step": calls.calls / steps,
        "transformer_rows_per_step": calls.rows / steps,
        **flop_fields(run, engine, request, s_per_step, images=images),
    }


def cfg_batcher(transformer: Any) -> Any:
    """The CFG batcher wrapping ``transformer`` (``runtime/cfg_batch.py``), or None."""
    from qwenserve.runtime.cfg_batch import CfgBatcher

    owner = getattr(transformer.forward, "__self__", None)
    return owner if isinstance(owner, CfgBatcher) else None


@contextmanager
def cfg_pairing(transformer: Any, on: bool) -> Iterator[Any]:
    """CFG pairing on or off for the calls inside, on the same engine (no second 41 GB build).

    The engine (built with ``cfg_batch`` on) arms the batcher before each CFG call; off, the
    batcher is never armed, so each pass runs on its own: what an engine with ``cfg_batch``
    off does, through one pass-through wrapper. Raises RuntimeError when there is no batcher
    to switch (the comparison would measure nothing)."""
    batcher = cfg_batcher(transformer)
    if batcher is None:
        raise RuntimeError("no CFG batcher on the transformer: pairing cannot be compared")
    if on:
        yield batcher
        return
    batcher.armed = lambda *_args, **_kwargs: nullcontext()  # instance attribute, undone below
    try:
        yield batcher
    finally:
        del batcher.armed
