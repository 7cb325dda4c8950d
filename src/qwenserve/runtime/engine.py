"""The Engine: a validated GenerationRequest in, a PIL image out, on the diffusers pipelines.

Base pipelines are resident and shared by residency key (``recipe.base_weights``): qwen-image and
qwen-image-fast run on one ``Qwen/Qwen-Image`` pipeline (loading, the memory plan and shared text
encoders and VAEs: ``resident.py``). LoRAs are peft adapters by name. A recipe's own LoRAs
(Lightning, presets) are loaded once per resident pipeline and switched on only for the calls that
use them; a request's extra LoRAs are loaded for that call alone and deleted in a ``finally``, so
one job's adapters never reach the next. The scheduler is chosen per call (stock or Lightning), and
every output is checked for NaN/inf before it is returned.

Batching: requests with equal ``batch_key`` run as one pipeline call (``generate_batch``), a
prompt list and one seeded generator per request, so each gets the image it would get alone up
to float rounding (measured in tests/runtime/test_batching.py). With ``fuse_lightning`` the fast
slugs get their own resident pipeline (key ``<base>+<lora file>``) with the LoRA fused in.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
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
    SchedulerKind,
    get_model,
)
from qwenserve.errors import InferenceError, InvalidInput, OutOfMemory, QwenServeError
from qwenserve.runtime.cfg_batch import CfgBatcher
from qwenserve.runtime.compile import CompileStats, run_warm_up, warm_up_requests, warming
from qwenserve.runtime.condition_area import capped_condition_area
from qwenserve.runtime.config import EngineConfig, GeneratedImage, resolve_cfg_batch
from qwenserve.runtime.fast_paths import check_switches, set_vae_tiling, step_cache_reset_on_error
from qwenserve.runtime.lora_check import read_lora
from qwenserve.runtime.prompt_cache import PromptCache
from qwenserve.runtime.resident import Resident, ResidentPipelines, device_budget
from qwenserve.runtime.schedulers import scheduler_for
from qwenserve.runtime.sizes import TINY_AREA, SizePlan, plan_size
from qwenserve.runtime.weights import WeightSource, describe_weights, weight_source

log = logging.getLogger("qwenserve.runtime")

# peft warns on every second adapter of a model; several named adapters is exactly the design.
warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)

# diffusers' pipelines are only partly typed (mixins add the LoRA API at runtime): Any it is.
Pipeline = Any

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ADAPTER_PREFIX = "qs_"  # adapter names that are nn.Module attributes (e.g. "train") crash
MAX_SEQUENCE_LENGTH = 1024
"""Prompt tokens kept (the pipelines refuse more; longer prompts are truncated)."""


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


def _adapter_name_for(source: LoraSource) -> str:
    digest = hashlib.sha256(f"{source.repo}/{source.filename}".encode()).hexdigest()[:12]
    return f"{_ADAPTER_PREFIX}{digest}"


@dataclass(frozen=True)
class PreparedCall:
    """The exact diffusers call ``generate`` makes (for benchmarks and debugging)."""

    pipeline: Pipeline
    kwargs: dict[str, Any]
    size: SizePlan


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
        self._job_counter = itertools.count(1)
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
        """One line for logs and the CLI; says plainly when images are noise."""
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
            f"qwenserve engine: {weights}; device {self.device.type}, {dtype}; "
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

    def load(self, slug: str, *, batch_sizes: Sequence[int] = (1,)) -> None:
        """Make ``slug``'s base pipeline (and its recipe LoRAs) resident, as a warm-up.

        With ``compile`` on, also compiles every variant the slug can produce (sizes, prompt
        lengths, ``batch_sizes``, adapter sets), so no user request waits for a compilation.
        """
        recipe = get_model(slug).recipe
        with self._lock:
            resident = self._resident_for(recipe)
            if recipe.lightning is not None and resident.fused is None:
                self._recipe_adapter(resident, recipe.lightning, field="lora")
            for source in recipe.preset_loras.values():
                self._recipe_adapter(resident, source, field="lora")
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
            log.info("warmed up %s in %.2fs", slug, timings[slug])
        return timings

    def _residency_key(self, recipe: Recipe) -> str:
        """The base weights id; a fused-Lightning pipeline is its own entry."""
        fused = self._fused_lora(recipe)
        if fused is None:
            return recipe.base_weights
        return f"{recipe.base_weights}+{fused.filename}"

    def _fused_lora(self, recipe: Recipe) -> LoraSource | None:
        if (
            self.config.fuse_lightning
            and recipe.scheduler is SchedulerKind.LIGHTNING
            and recipe.lightning is not None
        ):
            return recipe.lightning
        return None

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
            self._fuse(resident, fused)
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

    def _fuse(self, resident: Resident, source: LoraSource) -> None:
        """Fuse ``source`` into the transformer's weights and drop the adapter layers."""
        name = self._recipe_adapter(resident, source, field="lora")
        pipe = resident.pipe
        pipe.fuse_lora(components=["transformer"], lora_scale=source.weight, adapter_names=[name])
        pipe.unload_lora_weights()  # keeps the fused weights; only the adapter layers go
        resident.active = None
        resident.adapters.pop(source, None)
        resident.fused = source

    # --- adapters -----------------------------------------------------------------------------
    def _load_adapter(self, resident: Resident, path: Path, name: str, *, field: str) -> None:
        """Load ``path`` as adapter ``name``; InvalidInput(field) when it is not a LoRA for it."""
        pipe = resident.pipe
        lora = read_lora(pipe, path, pipe.transformer, field=field, model=resident.key)
        resident.active = None  # loading may change which adapters are active
        try:
            pipe.load_lora_into_transformer(
                lora.state_dict,
                transformer=pipe.transformer,
                adapter_name=name,
                metadata=lora.metadata,
                _pipeline=pipe,
            )
        except torch.OutOfMemoryError as error:
            self._drop_adapters(resident, [name])
            raise InferenceError(f"out of memory loading LoRA {path.name}") from error
        except Exception as error:
            self._drop_adapters(resident, [name])
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise InvalidInput(
                f"{field}: not a LoRA for {resident.key}: {reason}", field=field
            ) from error
        if name not in self._loaded_adapters(resident):
            raise InvalidInput(
                f"{field}: the file holds no LoRA weights for {resident.key}'s transformer",
                field=field,
            )

    @staticmethod
    def _loaded_adapters(resident: Resident) -> set[str]:
        names = resident.pipe.get_list_adapters()
        return {name for per_component in names.values() for name in per_component}

    def _drop_adapters(self, resident: Resident, names: Sequence[str]) -> None:
        present = [n for n in names if n in self._loaded_adapters(resident)]
        if present:
            resident.active = None
            resident.pipe.delete_adapters(present)

    def _recipe_adapter(self, resident: Resident, source: LoraSource, *, field: str) -> str:
        """The adapter name of a recipe LoRA, loading it into the resident pipeline once."""
        name = resident.adapters.get(source)
        if name is None:
            path = self._weights().lora_file(source, resident.key, resident.kind)
            name = _adapter_name_for(source)
            try:
                self._load_adapter(resident, path, name, field=field)
            except InvalidInput as error:
                # A recipe LoRA that does not fit its base is a deployment error, not the client's.
                raise InferenceError(f"recipe LoRA {source.repo}: {error.message}") from error
            resident.adapters[source] = name
        return name

    def _activate(self, resident: Resident, names: Sequence[str], weights: Sequence[float]) -> None:
        """Exactly ``names`` active for this call; none active leaves the base model exact.

        Setting adapters walks every LoRA layer (milliseconds per call); when the last call
        left exactly these active, nothing is done."""
        wanted = (tuple(names), tuple(weights))
        if resident.active == wanted:
            return
        pipe = resident.pipe
        if self._loaded_adapters(resident):
            if names:
                pipe.enable_lora()
                pipe.set_adapters(list(names), adapter_weights=list(weights))
            else:
                pipe.disable_lora()
        resident.active = wanted

    # --- sizes --------------------------------------------------------------------------------
    def output_size(
        self, request: GenerationRequest, input_sizes: Sequence[tuple[int, int]]
    ) -> tuple[int, int]:
        """The (width, height) ``generate`` returns for ``request`` with inputs of these sizes."""
        plan = plan_size(request, get_model(request.slug).recipe, input_sizes, tiny=self.is_tiny)
        return plan.width, plan.height

    # --- generation ---------------------------------------------------------------------------
    def _prompt_for(self, request: GenerationRequest, recipe: Recipe) -> str:
        if request.lora is None:
            return request.prompt
        preset = recipe.preset_loras.get(request.lora)
        if preset is None:
            raise InvalidInput(f"unknown preset LoRA {request.lora!r}", field="lora")
        return f"{preset.trigger}{request.prompt}" if preset.trigger else request.prompt

    @staticmethod
    def _negative_for(request: GenerationRequest) -> str:
        # True CFG runs only with a negative prompt; " " is what the official examples send.
        negative = request.negative_prompt
        return negative if negative and negative.strip() else " "

    def _call_kwargs(
        self,
        requests: Sequence[GenerationRequest],
        recipe: Recipe,
        images: Sequence[Image.Image],
        plan: SizePlan,
        pipe: Pipeline,
    ) -> dict[str, Any]:
        """The pipeline arguments for ``requests`` (one, or a batch sharing a batch key)."""
        first = requests[0]
        prompts = [self._prompt_for(r, recipe) for r in requests]
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        single = len(requests) == 1
        kwargs: dict[str, Any] = {
            "num_inference_steps": first.steps,
            "width": plan.generate_width,
            "height": plan.generate_height,
            "generator": generators[0] if single else generators,
            "output_type": "np",
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "true_cfg_scale": first.guidance if first.guidance > 1.0 else 1.0,
        }
        cfg = first.guidance > 1.0
        negatives = [self._negative_for(r) for r in requests] if cfg else []
        if recipe.pipeline is PipelineKind.TEXT_TO_IMAGE and self.config.prompt_cache_size > 0:
            embeds, mask = self._prompts.encode(
                pipe, recipe.base_weights, prompts, MAX_SEQUENCE_LENGTH
            )
            kwargs["prompt_embeds"], kwargs["prompt_embeds_mask"] = embeds, mask
            if cfg:
                embeds, mask = self._prompts.encode(
                    pipe, recipe.base_weights, negatives, MAX_SEQUENCE_LENGTH
                )
                kwargs["negative_prompt_embeds"] = embeds
                kwargs["negative_prompt_embeds_mask"] = mask
        else:
            kwargs["prompt"] = prompts[0] if single else prompts
            if cfg:
                kwargs["negative_prompt"] = negatives[0] if single else negatives
        if recipe.pipeline is PipelineKind.EDIT:
            if len(images) != 1:
                raise InvalidInput("this model edits exactly one image", field="image")
            kwargs["image"] = images[0]
        elif recipe.pipeline is PipelineKind.EDIT_PLUS:
            if not 1 <= len(images) <= max(recipe.max_input_images, 1):
                raise InvalidInput(
                    f"this model takes 1 to {recipe.max_input_images} images", field="image_1"
                )
            kwargs["image"] = list(images)
        return kwargs

    def _prepare(
        self,
        resident: Resident,
        recipe: Recipe,
        requests: Sequence[GenerationRequest],
        images: Sequence[Image.Image],
    ) -> tuple[dict[str, Any], SizePlan]:
        """Scheduler, VAE tiling and arguments for one call (adapters are already active)."""
        first = requests[0]
        one_step = first.steps <= 1
        scheduler = resident.schedulers.get((recipe.scheduler, one_step))
        if scheduler is None:
            scheduler = scheduler_for(recipe.scheduler, first.steps, resident.stock_scheduler)
            resident.schedulers[(recipe.scheduler, one_step)] = scheduler
        if resident.pipe.scheduler is not scheduler:
            resident.pipe.scheduler = scheduler
        plan = plan_size(first, recipe, [i.size for i in images], tiny=self.is_tiny)
        tiled = self._pipelines.wants_vae_tiling(
            plan.generate_width, plan.generate_height, len(requests)
        )
        set_vae_tiling(resident.pipe, tiled)
        return self._call_kwargs(requests, recipe, images, plan, resident.pipe), plan

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
            names, weights = self._recipe_adapters_for(resident, recipe, request)
            self._activate(resident, names, weights)
            kwargs, plan = self._prepare(resident, recipe, [request], images)
            return PreparedCall(resident.pipe, kwargs, plan)

    def _recipe_adapters_for(
        self, resident: Resident, recipe: Recipe, request: GenerationRequest
    ) -> tuple[list[str], list[float]]:
        names: list[str] = []
        weights: list[float] = []
        if (
            recipe.scheduler is SchedulerKind.LIGHTNING
            and recipe.lightning is not None
            and resident.fused is None
        ):
            names.append(self._recipe_adapter(resident, recipe.lightning, field="lora"))
            weights.append(recipe.lightning.weight)
        if request.lora is not None and request.lora in recipe.preset_loras:
            preset = recipe.preset_loras[request.lora]
            names.append(self._recipe_adapter(resident, preset, field="lora"))
            weights.append(preset.weight)
        return names, weights

    def generate(
        self,
        request: GenerationRequest,
        *,
        images: Sequence[Image.Image] = (),
        extra_loras: Sequence[Path] = (),
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GeneratedImage:
        """Run ``request`` and return its image (RGB, exactly the planned width x height).

        ``images`` are the decoded inputs in ``request.images`` order; ``extra_loras`` local
        LoRA files in ``request.extra_loras`` order, active for this call only. ``on_step``
        gets (steps done, total) after each denoising step; ``should_cancel`` is checked there.

        Raises InvalidInput (naming the field) for a LoRA file that is not a LoRA for this model,
        OutOfMemory (an InferenceError naming the size) when the device runs out of memory,
        InferenceError for other engine failures: NaN output, cancellation ("cancelled"),
        weights that cannot be loaded.
        """
        spec = get_model(request.slug)
        recipe = spec.recipe
        with self._lock:
            resident = self._resident_for(recipe)
            names, weights = self._recipe_adapters_for(resident, recipe, request)
            started = time.perf_counter()
            job_names: list[str] = []
            try:
                job = next(self._job_counter)
                for index, path in enumerate(extra_loras):
                    ref_field = (
                        request.extra_loras[index].field
                        if index < len(request.extra_loras)
                        else f"lora_{index + 2}_url"
                    )
                    name = f"{_ADAPTER_PREFIX}job{job}_{index}"
                    job_names.append(name)
                    self._load_adapter(resident, Path(path), name, field=ref_field)
                self._activate(resident, names + job_names, weights + [1.0] * len(job_names))
                kwargs, plan = self._prepare(resident, recipe, [request], images)
                pixels = self._run(resident, kwargs, plan, request.steps, on_step, should_cancel)
            finally:
                if job_names:
                    # Recipe adapters only, then delete: nothing of this job reaches the next.
                    self._activate(resident, names, weights)
                    self._drop_adapters(resident, job_names)
            elapsed_s = time.perf_counter() - started
        image = _to_image(pixels[0], plan)
        log.info(
            "generated %s %dx%d seed=%d steps=%d in %.2fs",
            request.slug,
            plan.width,
            plan.height,
            request.seed,
            request.steps,
            elapsed_s,
        )
        return GeneratedImage(
            image=image,
            seed=request.seed,
            width=plan.width,
            height=plan.height,
            inference_time_s=elapsed_s,
        )

    # --- batching -----------------------------------------------------------------------------
    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        """Requests with equal non-None keys can run in one ``generate_batch`` call.

        None (never batched) for edit slugs (edit-plus refuses batches; one-image edit gains
        little, each prompt needing its own image) and for requests with extra LoRAs (their
        adapters are per job). The key holds everything one pipeline call shares: the slug and
        its recipe adapters, the preset LoRA, the planned size, steps, and the CFG scale (CFG
        on means a negative prompt is always sent, so its presence is implied by the scale).
        """
        recipe = get_model(request.slug).recipe
        if recipe.pipeline is not PipelineKind.TEXT_TO_IMAGE or request.extra_loras:
            return None
        plan = plan_size(request, recipe, [], tiny=self.is_tiny)
        cfg_scale = request.guidance if request.guidance > 1.0 else 1.0
        return (
            request.slug,
            self._residency_key(recipe),
            request.lora,
            (plan.generate_width, plan.generate_height, plan.width, plan.height),
            request.steps,
            cfg_scale,
        )

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        images: Sequence[Sequence[Image.Image]] = (),
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[GeneratedImage]:
        """Run ``requests`` (all with one non-None ``batch_key``) as one pipeline call.

        One prompt per request (and one negative prompt when CFG is on) and one
        ``torch.Generator`` per request seeded with its own seed, so each image is the one it
        would get alone, up to float rounding in the batched kernels (tests/runtime/
        test_batching.py states the measured difference). Results come back in request order,
        each with its own seed and size; ``inference_time_s`` of every result is the wall time
        of the whole batch (the requests shared it). A single request is simply ``generate``.

        Raises InferenceError when the keys differ or are None for a batch of more than one, on
        cancellation ("cancelled": the whole batch) or a NaN in any image (the whole batch is
        discarded), and OutOfMemory naming size and batch (the worker retries it in halves).
        """
        if not requests:
            return []
        per_request_images = list(images) if images else [() for _ in requests]
        if len(per_request_images) != len(requests):
            raise InferenceError("generate_batch: one image list per request, or none")
        if len(requests) == 1:
            return [
                self.generate(
                    requests[0],
                    images=per_request_images[0],
                    on_step=on_step,
                    should_cancel=should_cancel,
                )
            ]
        keys = {self.batch_key(r) for r in requests}
        if None in keys or len(keys) != 1:
            raise InferenceError("generate_batch: these requests cannot share one pipeline call")
        first = requests[0]
        recipe = get_model(first.slug).recipe
        with self._lock:
            resident = self._resident_for(recipe)
            names, weights = self._recipe_adapters_for(resident, recipe, first)
            started = time.perf_counter()
            self._activate(resident, names, weights)
            kwargs, plan = self._prepare(resident, recipe, requests, [])
            pixels = self._run(resident, kwargs, plan, first.steps, on_step, should_cancel)
            elapsed_s = time.perf_counter() - started
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
                image=_to_image(pixels[index], plan),
                seed=request.seed,
                width=plan.width,
                height=plan.height,
                inference_time_s=elapsed_s,
            )
            for index, request in enumerate(requests)
        ]

    def _run(
        self,
        resident: Resident,
        kwargs: dict[str, Any],
        size: SizePlan,
        total_steps: int,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> np.ndarray[Any, Any]:
        """Call the pipeline; returns float pixels [B, H, W, 3] in [0, 1].

        Raises OutOfMemory (naming size and batch) once the memory the call held is freed."""
        cancelled = False
        out_of_memory = False

        def step_end(
            pipeline: Pipeline, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal cancelled
            if on_step is not None:
                on_step(step + 1, total_steps)
            if should_cancel is not None and should_cancel():
                cancelled = True
                pipeline._interrupt = True  # skips the remaining steps (the image is discarded)
            return {}

        # The tiny preset's edit inputs need not be VAE-encoded at ~1 MP: the images are noise.
        capped = self.is_tiny and resident.kind is not PipelineKind.TEXT_TO_IMAGE
        negative = kwargs.get("negative_prompt_embeds")
        try:
            with contextlib.ExitStack() as scope:
                scope.enter_context(step_cache_reset_on_error(resident.pipe, self.config))
                if capped:
                    scope.enter_context(capped_condition_area(TINY_AREA))
                if resident.cfg is not None and negative is not None:
                    mask = self._prompts.unless_all_ones(kwargs.get("negative_prompt_embeds_mask"))
                    scope.enter_context(resident.cfg.armed(negative, mask))
                output = resident.pipe(**kwargs, callback_on_step_end=step_end)
        except QwenServeError:
            raise
        except Exception as error:
            if not _is_out_of_memory(error):
                raise InferenceError(
                    f"generation failed: {type(error).__name__}: {error}"
                ) from error
            out_of_memory = True  # raised below: the error's frames hold the call's tensors
        if out_of_memory:
            self._pipelines.release_memory()
            batch = len(kwargs["generator"]) if isinstance(kwargs["generator"], list) else 1
            raise OutOfMemory(
                f"out of memory generating {size.width}x{size.height} ×{batch} on "
                f"{self.device.type}: "
                + ("retry in smaller batches" if batch > 1 else "try a smaller size")
            )
        if cancelled:
            raise InferenceError("cancelled")
        pixels: np.ndarray[Any, Any] = np.asarray(output.images)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if not np.isfinite(pixels).all():
            raise InferenceError("the model produced NaN/inf values; the image was discarded")
        return pixels


def _is_out_of_memory(error: Exception) -> bool:
    """CUDA's typed error, or the CPU allocator's plain RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def _to_image(pixels: np.ndarray[Any, Any], plan: SizePlan) -> Image.Image:
    """Float [0, 1] HxWx3 → RGB image of exactly the planned size: center-cropped from a
    slightly larger one, or (tiny preset, large explicit sizes) resized from a smaller one."""
    array = (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)
    image = Image.fromarray(array, mode="RGB") if array.ndim == 3 else Image.fromarray(array)
    image = image.convert("RGB")
    if plan.needs_resize:
        return image.resize((plan.width, plan.height), Image.Resampling.BICUBIC)
    if image.size != (plan.width, plan.height):
        left = (image.width - plan.width) // 2
        top = (image.height - plan.height) // 2
        image = image.crop((left, top, left + plan.width, top + plan.height))
    return image
