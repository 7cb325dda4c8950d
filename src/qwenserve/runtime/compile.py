"""``compile``: regional compilation of the transformer's repeated blocks, warmed up once.

Compiling the whole transformer traces one large graph per shape, adapter state and batch size,
and recompiles (minutes on a 20B model) whenever a request brings a new one. Instead:

- **Regional**: only the repeated ``QwenImageTransformerBlock`` is compiled (diffusers'
  ``compile_repeated_blocks``). All 60 blocks share one compiled graph, so a variant costs one
  block's compile, not the model's.
- **Dynamic shapes** (``dynamic=True``): image and text lengths are symbolic from the first
  compile, so new sizes and prompt lengths reuse it. Batch size 1 is still specialised by torch
  (sizes 0 and 1 always are), and each LoRA adapter set guards its own graph.
- **Warm-up covers the variants** (``warm_up_requests``): every native size of each served
  slug, two prompt lengths, batch sizes 1 and 2 when batching is on, each recipe adapter set.
- **After warm-up, never a compile on a user request**: the transformer runs under
  ``torch.compiler.set_stance("eager_on_recompile")``; a variant warm-up missed runs eagerly
  (slower, never a stall) and is counted.

``CompileStats`` counts graphs compiled during warm-up, graphs compiled after it (expected 0)
and block calls that fell back to eager; the worker announces them for ``/metrics``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from PIL import Image

from qwenserve.catalog import GenerationRequest, ModelSpec, get_model, validate_request

RECOMPILE_LIMIT = 64
"""Compiled variants kept per code object (torch's default is 8). The blocks of every resident
pipeline share one code object (``nn.Module._call_impl``), so sizes x batch x adapter sets of
all served slugs add up; past the limit torch silently stops compiling that code."""

_GUARD_HOOK = "qwenserve_compile_guard"
_EAGER_HOOK = "qwenserve_eager_counter"
_PROMPTS = ("a lighthouse", "a red lighthouse on a rocky coast at dusk, oil painting, warm light")
"""Two prompt lengths: the text length must be symbolic after warm-up, not specialised."""


@dataclass
class CompileStats:
    """One engine's compilation counts (all its resident pipelines together)."""

    compiles: int = 0
    """Graphs compiled while a pipeline warmed up (or before it was warmed)."""
    recompiles: int = 0
    """Graphs compiled after warm-up: a variant warm-up missed (expected 0)."""
    eager_fallbacks: int = 0
    """Block calls that ran eagerly after warm-up (a variant without a compiled graph)."""

    def as_dict(self) -> dict[str, int]:
        return {
            "compiles": self.compiles,
            "recompiles": self.recompiles,
            "eager_fallbacks": self.eager_fallbacks,
        }


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _original(hook: ModelHook) -> Any:
    """The forward a diffusers hook wraps (typed None until the hook is registered)."""
    return cast(Any, hook.fn_ref).original_forward


class _CompileGuard(ModelHook):
    """On the (uncompiled) transformer: counts the graphs each call compiles, and after warm-up
    runs the call under the ``eager_on_recompile`` stance."""

    def __init__(self, stats: CompileStats) -> None:
        super().__init__()
        self.stats = stats
        self.warmed = False

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        before = _graphs_compiled()
        try:
            if not self.warmed:
                return _original(self)(*args, **kwargs)
            with torch.compiler.set_stance("eager_on_recompile"):
                return _original(self)(*args, **kwargs)
        finally:
            compiled = _graphs_compiled() - before
            if self.warmed:
                self.stats.recompiles += compiled
            else:
                self.stats.compiles += compiled


class _EagerCounter(ModelHook):
    """On each compiled block: counts calls that run eagerly. ``is_compiling()`` is a constant
    True inside a compiled graph, so the count only moves on an eager fallback."""

    def __init__(self, guard: _CompileGuard) -> None:
        super().__init__()
        self.guard = guard

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling() and self.guard.warmed:
            self.guard.stats.eager_fallbacks += 1
        return _original(self)(*args, **kwargs)


def compile_blocks(transformer: Any, stats: CompileStats, *, fullgraph: bool = True) -> None:
    """Regionally compile ``transformer`` (in place) with dynamic shapes, counting into ``stats``.

    The counting hooks go on before compilation, so the compiled blocks include them.
    ``fullgraph=False`` is for hooks that break the graph on purpose (the step cache's
    data-dependent skip decision)."""
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
    )
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT
    )
    guard = _CompileGuard(stats)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(guard, _GUARD_HOOK)
    for block in _repeated_blocks(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.register_hook(_EagerCounter(guard), _EAGER_HOOK)
    transformer.compile_repeated_blocks(fullgraph=fullgraph, dynamic=True)


def _repeated_blocks(transformer: Any) -> Iterator[torch.nn.Module]:
    names = set(getattr(transformer, "_repeated_blocks", ()))
    for module in transformer.modules():
        if type(module).__name__ in names:
            yield module


@contextmanager
def warming(transformer: Any) -> Iterator[None]:
    """Within this block ``transformer`` compiles what it meets; afterwards (also after a failed
    warm-up) it never compiles again: a new variant runs eagerly and is counted. A no-op for a
    transformer ``compile_blocks`` did not prepare."""
    registry = getattr(transformer, "_diffusers_hook", None)
    guard = registry.get_hook(_GUARD_HOOK) if registry is not None else None
    if not isinstance(guard, _CompileGuard):
        yield
        return
    guard.warmed = False
    try:
        yield
    finally:
        guard.warmed = True


# --- warm-up ------------------------------------------------------------------------------------
class BatchGenerator(Protocol):
    """What the warm-up needs of the engine."""

    def generate(self, request: GenerationRequest, *, images: Sequence[Image.Image] = ()) -> Any:
        """One request."""
        ...

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> Any:
        """Requests sharing one batch key."""
        ...

    def batch_key(self, request: GenerationRequest) -> Any:
        """None when ``request`` is never batched."""
        ...


@dataclass(frozen=True)
class WarmUpCall:
    """One warm-up pipeline call: its requests (one, or a batch) and input images."""

    requests: tuple[GenerationRequest, ...]
    images: tuple[Image.Image, ...] = ()


def warm_up_requests(slug: str, *, batch_sizes: Sequence[int] = (1,)) -> list[WarmUpCall]:
    """The calls that compile every variant ``slug`` can produce: each native size (or, for
    edit slugs without one, inputs of two shapes), both prompt lengths, each batch size (batches
    mix the two lengths, so the padded, masked text is covered too), each preset LoRA."""
    spec = get_model(slug)
    presets: list[str | None] = [None]
    lora = spec.param("lora")
    if lora is not None and lora.allowed:
        presets += [name for name in lora.allowed if name in spec.recipe.preset_loras]
    calls: list[WarmUpCall] = []
    for preset in presets:
        for shape, images in _shapes(spec):
            for prompt in _PROMPTS:
                request = _request(spec, prompt, shape, images, preset)
                calls.append(WarmUpCall((request,), tuple(images)))
            for size in batch_sizes:
                if size > 1 and not images:
                    batch = tuple(
                        _request(spec, _PROMPTS[i % 2], shape, images, preset, seed=i + 1)
                        for i in range(size)
                    )
                    calls.append(WarmUpCall(batch))
    return calls


def run_warm_up(engine: BatchGenerator, slug: str, *, batch_sizes: Sequence[int] = (1,)) -> int:
    """Run ``warm_up_requests`` through ``engine``; returns the number of pipeline calls."""
    calls = warm_up_requests(slug, batch_sizes=batch_sizes)
    for call in calls:
        if len(call.requests) > 1 and engine.batch_key(call.requests[0]) is not None:
            engine.generate_batch(call.requests)
        else:
            engine.generate(call.requests[0], images=call.images)
    return len(calls)


def _shapes(spec: ModelSpec) -> list[tuple[dict[str, Any], list[Image.Image]]]:
    """(size fields, input images) per size the slug can produce."""
    recipe = spec.recipe
    if spec.image_fields and spec.param("aspect_ratio") is None:
        # The output follows the input's aspect ratio: a square and a wide input.
        return [({}, [_grey(512, 512)]), ({}, [_grey(768, 432)])]
    images = [_grey(512, 512)] if spec.image_fields else []
    if spec.param("aspect_ratio") is not None:
        param = spec.param("aspect_ratio")
        ratios = list(recipe.native_sizes) or [
            r for r in (param.allowed if param is not None and param.allowed else ()) if ":" in r
        ]
        # Qwen-Image 2.1 runs with and without references: both sequence layouts.
        variants = [[], images] if recipe.images_optional else [images]
        return [({"aspect_ratio": ratio}, found) for ratio in ratios for found in variants]
    return [({"width": w, "height": h}, images) for w, h in recipe.native_sizes.values()]


def _request(
    spec: ModelSpec,
    prompt: str,
    shape: dict[str, Any],
    images: Sequence[Image.Image],
    preset: str | None,
    *,
    seed: int = 1,
) -> GenerationRequest:
    body: dict[str, Any] = {"prompt": prompt, "seed": seed, **shape}
    if spec.param("steps") is not None:
        body["steps"] = 2
    for field, image in zip(spec.image_fields, images, strict=False):
        body[field] = _png_base64(image)
    if preset is not None:
        body["lora"] = preset
    return validate_request(spec.slug, body)


def _grey(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
