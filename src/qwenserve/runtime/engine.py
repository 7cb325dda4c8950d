"""The Engine: validated GenerationRequests in, PIL images out, on the diffusers pipelines.

The public facade over the runtime, and the one generate path: ``generate`` (one request) and
``generate_batch`` (requests with equal ``batch_key``) both run ``_generate``, where a single
request is a batch of one. Each call takes the engine lock, gets the resident pipeline
(``resident.py``: loading, the memory plan, shared text encoders and VAEs), switches on its
adapters (``adapters.py``: recipe LoRAs kept loaded, a job's extra LoRAs for that call alone),
builds the diffusers call (``call.py``: prompts, prompt-cache embeddings, one seeded generator
per request, size, scheduler, VAE tiling) and runs it (``run.py``: progress and cancellation
through the step callback, out of memory, NaN checks, the exactly sized image).

A batch gives each request the image it would get alone up to float rounding (measured in
tests/runtime/test_batching.py). With ``fuse_lightning`` the fast slugs get their own resident
pipeline (key ``<base>+<lora file>``) with the LoRA fused in.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwenserve.catalog import (
    GenerationRequest,
    LoraSource,
    PipelineKind,
    Recipe,
    get_model,
)
from qwenserve.errors import InferenceError
from qwenserve.runtime.adapters import Adapters, activate
from qwenserve.runtime.batch_keys import batch_key, fused_lora, residency_key
from qwenserve.runtime.call import PreparedCall, build_call
from qwenserve.runtime.cfg_batch import CfgBatcher
from qwenserve.runtime.compile import CompileStats, run_warm_up, warm_up_requests, warming
from qwenserve.runtime.condition_area import capped_condition_area
from qwenserve.runtime.config import EngineConfig, GeneratedImage, resolve_cfg_batch
from qwenserve.runtime.fast_paths import check_switches, step_cache_reset_on_error
from qwenserve.runtime.loading import LoadTimings
from qwenserve.runtime.preview import PreviewCallback, preview_hook
from qwenserve.runtime.prompt_cache import PromptCache
from qwenserve.runtime.resident import Resident, ResidentPipelines, device_budget
from qwenserve.runtime.run import run_pipeline, to_image
from qwenserve.runtime.sizes import TINY_AREA, SizePlan, plan_size
from qwenserve.runtime.weights import WeightSource, describe_weights, weight_source

log = logging.getLogger("qwenserve.runtime")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA, else Apple MPS, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps"):
        raise InferenceError(f"unknown device {device!r}; expected auto, cpu, cuda or mps")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InferenceError(f"unknown dtype {dtype!r}; expected auto, bfloat16, float16, float32")
    return _DTYPES[dtype]


class Engine:
    """Turns validated requests into images; one worker thread uses it at a time.

    Construction is cheap: pipelines load on first use (or ``load(slug)``) and stay resident.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._source: WeightSource | None = None
        self._lock = threading.RLock()
        self._compile_stats = CompileStats()
        self._pipelines = ResidentPipelines(
            config,
            self.device,
            self.dtype,
            self._weights,
            device_budget(config, self.device),
            self._compile_stats,
        )
        self._resident_keys: tuple[str, ...] = ()
        self._adapters = Adapters(self._weights)
        self._prompts = PromptCache(max(config.prompt_cache_size, 0))
        check_switches(config, self.device)
        if config.weights == "random-full" and self.device.type != "cuda":
            raise InferenceError(
                f"random-full needs a CUDA GPU (this engine runs on {self.device.type}): "
                "it is the real 20B transformer; use weights='tiny' on a CPU"
            )

    # --- description --------------------------------------------------------------------------
    @property
    def is_tiny(self) -> bool:
        """True for the random-weights preset."""
        return self.config.weights == "tiny"

    @property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.config.dtype, self.device)

    def describe(self) -> str:
        """One line for logs and the CLI (callers prefix "engine: "); says plainly when images
        are noise."""
        weights = describe_weights(self.config.weights)
        dtype = str(self.dtype).removeprefix("torch.")
        config = self.config
        switches = [
            name
            for name, on in (
                ("fused Lightning", config.fuse_lightning),
                ("compiled", config.compile),
                (f"quantize {config.quantize}", config.quantize != "none"),
                ("CPU offload", config.cpu_offload),
                (f"step cache {config.step_cache}", config.step_cache is not None),
            )
            if on
        ]
        return (
            f"{weights}; device {self.device.type}, {dtype}; "
            f"up to {config.resident_models} resident pipeline(s)"
            + (f"; {', '.join(switches)}" if switches else "")
        )

    @property
    def prompt_cache(self) -> PromptCache:
        """The text-encoder output cache (its ``hits``/``misses`` counters are for metrics)."""
        return self._prompts

    def resident(self) -> list[str]:
        """Residency keys (base weight ids) currently loaded, least recently used first.

        A snapshot taken at each load or use: never waits for the engine lock, which a running
        job holds (the heartbeat and the worker's look-ahead ask while one runs)."""
        return list(self._resident_keys)

    # --- loading ------------------------------------------------------------------------------
    def _weights(self) -> WeightSource:
        if self._source is None:
            self._source = weight_source(self.config.weights, self.config.cache_dir)
        return self._source

    def compile_counts(self) -> dict[str, int]:
        """Graphs compiled at warm-up and after it, and eager fallbacks (``compile``; metrics)."""
        return self._compile_stats.as_dict()

    def pipeline_counts(self) -> dict[str, dict[str, int]]:
        """Pipelines loaded and evicted so far, by residency key (metrics)."""
        pipelines = self._pipelines
        return {"loads": dict(pipelines.loads), "evictions": dict(pipelines.evictions)}

    def load_timings(self) -> list[LoadTimings]:
        """Every pipeline load so far, oldest first, warm-up included (``LoadTimings``)."""
        return list(self._pipelines.load_timings)

    def device_memory(self) -> dict[str, int]:
        """CUDA memory allocated and reserved by torch in bytes (metrics); empty elsewhere."""
        if self.device.type != "cuda":
            return {}
        return {
            "gpu_allocated": int(torch.cuda.memory_allocated(self.device)),
            "gpu_reserved": int(torch.cuda.memory_reserved(self.device)),
        }

    def load(self, slug: str, *, batch_sizes: Sequence[int] = (1,)) -> None:
        """Make ``slug``'s base pipeline (and its recipe LoRAs) resident, as a warm-up.

        With ``compile`` on, also compiles every variant the slug can produce (sizes, prompt
        lengths, ``batch_sizes``, adapter sets), so no user request waits for a compilation.
        """
        recipe = get_model(slug).recipe
        with self._lock:
            resident = self._resident_for(recipe)
            self._adapters.load_recipe(resident, recipe)
            if self.config.compile and slug not in resident.warmed:
                with warming(resident.pipe.transformer):
                    run_warm_up(self, slug, batch_sizes=batch_sizes)
                resident.warmed.add(slug)

    def warm_up(
        self, slugs: Sequence[str], *, batch_sizes: Sequence[int] = (1,)
    ) -> dict[str, float]:
        """Load each slug and run one small generation with it (with ``compile``, every
        variant ``load`` compiles); returns seconds per slug.

        Pays every first-call cost (compilation, CUDA kernel selection, LoRA loading) before
        the worker takes jobs. ``batch_sizes``: (1, 2) when the worker batches.
        """
        timings: dict[str, float] = {}
        for slug in slugs:
            started = time.perf_counter()
            self.load(slug, batch_sizes=batch_sizes)
            if not self.config.compile:  # compiled pipelines ran every variant in load()
                call = warm_up_requests(slug)[0]
                self.generate(call.requests[0], images=call.images)
            timings[slug] = time.perf_counter() - started
            self._pipelines.note_warm_up(self._residency_key(get_model(slug).recipe), timings[slug])
        return timings

    def _residency_key(self, recipe: Recipe) -> str:
        return residency_key(recipe, self.config)

    def _fused_lora(self, recipe: Recipe) -> LoraSource | None:
        return fused_lora(recipe, self.config)

    def _resident_for(self, recipe: Recipe) -> Resident:
        try:
            return self._load_or_reuse(recipe)
        finally:
            self._resident_keys = tuple(self._pipelines.keys())

    def _load_or_reuse(self, recipe: Recipe) -> Resident:
        key = self._residency_key(recipe)
        resident = self._pipelines.get(key)
        if resident is None:
            resident = self._pipelines.load(key, recipe, lambda r: self._prepare_loaded(r, recipe))
        return resident

    def _prepare_loaded(self, resident: Resident, recipe: Recipe) -> None:
        """Engine-specific steps on a freshly loaded pipeline, before its fast paths."""
        fused = self._fused_lora(recipe)
        if fused is not None:
            self._adapters.fuse(resident, fused)
        if self._wants_cfg_batch(recipe):
            resident.cfg = CfgBatcher(resident.pipe.transformer)

    def _wants_cfg_batch(self, recipe: Recipe) -> bool:
        """Only where the engine knows the negative embeddings before the call (the prompt
        cache, text-to-image) and no other wrapper of the transformer needs the two passes."""
        config = self.config
        return (
            resolve_cfg_batch(config, self.device.type)
            and recipe.pipeline is PipelineKind.TEXT_TO_IMAGE
            and config.prompt_cache_size > 0
            and not config.compile
            and config.step_cache is None
        )

    # --- sizes --------------------------------------------------------------------------------
    def output_size(
        self, request: GenerationRequest, input_sizes: Sequence[tuple[int, int]]
    ) -> tuple[int, int]:
        """The (width, height) ``generate`` returns for ``request`` with inputs of these sizes."""
        plan = plan_size(request, get_model(request.slug).recipe, input_sizes, tiny=self.is_tiny)
        return plan.width, plan.height

    def prepare_call(
        self,
        request: GenerationRequest,
        images: Sequence[Image.Image] = (),
    ) -> PreparedCall:
        """Load the pipeline and set adapters and scheduler as ``generate`` would, without
        running it: returns the pipeline and the arguments ``generate`` passes to it."""
        recipe = get_model(request.slug).recipe
        with self._lock:
            resident = self._resident_for(recipe)
            names, weights = self._adapters.for_request(resident, recipe, request)
            activate(resident, names, weights)
            kwargs, plan = self._prepare(resident, recipe, [request], images)
            return PreparedCall(resident.pipe, kwargs, plan)

    # --- generation ---------------------------------------------------------------------------
    def generate(
        self,
        request: GenerationRequest,
        *,
        images: Sequence[Image.Image] = (),
        extra_loras: Sequence[Path] = (),
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> GeneratedImage:
        """Run ``request`` and return its image (RGB, or RGBA where Qwen-Image 2.1 made a
        transparent one; exactly the planned width x height).

        ``images`` are the decoded inputs in ``request.images`` order; ``extra_loras`` local
        LoRA files in ``request.extra_loras`` order, active for this call only. ``on_step``
        gets (steps done, total) after each denoising step; ``should_cancel`` is checked there;
        ``on_preview`` gets each preview ``request.partial_images`` asks for (``preview.py``).

        Raises InvalidInput (naming the field) for a LoRA file that is not a LoRA for this model,
        OutOfMemory (an InferenceError naming the size) when the device runs out of memory,
        InferenceError for other engine failures: NaN output, cancellation ("cancelled"),
        weights that cannot be loaded.
        """
        return self._generate([request], [images], extra_loras, on_step, should_cancel, on_preview)[
            0
        ]

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        """Requests with equal non-None keys can run in one ``generate_batch`` call
        (``batch_keys.batch_key`` says which; the worker's parent computes the same without
        torch)."""
        return batch_key(request, self.config)

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        images: Sequence[Sequence[Image.Image]] = (),
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """Run ``requests`` (all with one non-None ``batch_key``) as one pipeline call.

        One prompt per request (and one negative prompt when CFG is on) and one
        ``torch.Generator`` per request seeded with its own seed, so each image is the one it
        would get alone, up to float rounding in the batched kernels (tests/runtime/
        test_batching.py states the measured difference). Results come back in request order,
        each with its own seed and size; ``inference_time_s`` of every result is the wall time
        of the whole batch (the requests shared it). A single request runs as ``generate``.

        Raises InferenceError when the keys differ or are None for a batch of more than one, on
        cancellation ("cancelled": the whole batch) or a NaN in any image (the whole batch is
        discarded), and OutOfMemory naming size and batch (the worker retries it in halves).
        """
        if not requests:
            return []
        per_request_images = list(images) if images else [() for _ in requests]
        if len(per_request_images) != len(requests):
            raise InferenceError("generate_batch: one image list per request, or none")
        return self._generate(requests, per_request_images, (), on_step, should_cancel, on_preview)

    def _generate(
        self,
        requests: Sequence[GenerationRequest],
        images: Sequence[Sequence[Image.Image]],
        extra_loras: Sequence[Path],
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """The one generate path: ``requests`` (one, or several sharing a batch key) as one
        pipeline call. Input images and extra LoRAs only for a batch of one (batches are
        text-to-image without extra LoRAs, as ``batch_key`` guarantees)."""
        single = len(requests) == 1
        if not single:
            keys = {self.batch_key(r) for r in requests}
            if None in keys or len(keys) != 1 or extra_loras:
                raise InferenceError(
                    "generate_batch: these requests cannot share one pipeline call"
                )
        first = requests[0]
        recipe = get_model(first.slug).recipe
        with self._lock:
            resident = self._resident_for(recipe)
            recipe_adapters = self._adapters.for_request(resident, recipe, first)
            started = time.perf_counter()
            with self._adapters.active(resident, recipe_adapters, first, extra_loras):
                call_images = images[0] if single else []
                kwargs, plan = self._prepare(resident, recipe, requests, call_images)
                on_latents = preview_hook(requests, plan, resident.pipe, on_preview)
                pixels = self._run(
                    resident, kwargs, plan, first.steps, on_step, should_cancel, on_latents
                )
            elapsed_s = time.perf_counter() - started
        if single:
            log.info(
                "generated %s %dx%d seed=%d steps=%d in %.2fs",
                first.slug,
                plan.width,
                plan.height,
                first.seed,
                first.steps,
                elapsed_s,
            )
        else:
            log.info(
                "generated a batch of %d %s %dx%d seeds=%s steps=%d in %.2fs",
                len(requests),
                first.slug,
                plan.width,
                plan.height,
                ",".join(str(r.seed) for r in requests),
                first.steps,
                elapsed_s,
            )
        return [
            GeneratedImage(
                image=to_image(pixels[index], plan),
                seed=request.seed,
                width=plan.width,
                height=plan.height,
                inference_time_s=elapsed_s,
            )
            for index, request in enumerate(requests)
        ]

    def _prepare(
        self,
        resident: Resident,
        recipe: Recipe,
        requests: Sequence[GenerationRequest],
        images: Sequence[Image.Image],
    ) -> tuple[dict[str, Any], SizePlan]:
        """``build_call`` with this engine's size preset, prompt cache and tiling plan."""
        return build_call(
            resident,
            recipe,
            requests,
            images,
            tiny=self.is_tiny,
            prompts=self._prompts if self.config.prompt_cache_size > 0 else None,
            vae_tiling=self._pipelines.wants_vae_tiling,
        )

    def _run(
        self,
        resident: Resident,
        kwargs: dict[str, Any],
        plan: SizePlan,
        total_steps: int,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        on_latents: Callable[[int, Any], None] | None = None,
    ) -> np.ndarray[Any, Any]:
        """``run_pipeline`` within the scopes this call needs: the step cache reset on an
        error, the tiny preset's capped edit inputs, CFG pairing armed with the negatives."""
        scopes: list[contextlib.AbstractContextManager[Any]] = [
            step_cache_reset_on_error(resident.pipe, self.config)
        ]
        # The tiny preset's edit inputs need not be VAE-encoded at ~1 MP: the images are noise.
        # (Qwen-Image 2.1 sizes its references by ``output_resolution`` instead.)
        if self.is_tiny and resident.kind in (PipelineKind.EDIT, PipelineKind.EDIT_PLUS):
            scopes.append(capped_condition_area(TINY_AREA))
        negative = kwargs.get("negative_prompt_embeds")
        if resident.cfg is not None and negative is not None:
            mask = self._prompts.unless_all_ones(kwargs.get("negative_prompt_embeds_mask"))
            scopes.append(resident.cfg.armed(negative, mask))
        return run_pipeline(
            resident.pipe,
            kwargs,
            plan,
            total_steps=total_steps,
            on_step=on_step,
            should_cancel=should_cancel,
            on_latents=on_latents,
            scopes=scopes,
            free_memory=self._pipelines.release_memory,
            device_type=self.device.type,
        )
