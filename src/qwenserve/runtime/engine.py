"""The Engine: a validated GenerationRequest in, a PIL image out, on the diffusers pipelines.

Base pipelines are resident and shared by residency key (``recipe.base_weights``): qwen-image and
qwen-image-fast run on one ``Qwen/Qwen-Image`` pipeline. LoRAs are peft adapters by name. A
recipe's own LoRAs (Lightning, presets) are loaded once per resident pipeline and switched on
only for the calls that use them; a request's extra LoRAs are loaded for that call alone and
deleted in a ``finally``, so one job's adapters never reach the next. The scheduler is chosen per
call (stock or Lightning), and every output is checked for NaN/inf before it is returned.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from qwenserve.catalog import (
    GenerationRequest,
    LoraSource,
    PipelineKind,
    Recipe,
    SchedulerKind,
    get_model,
)
from qwenserve.errors import InferenceError, InvalidInput, QwenServeError
from qwenserve.runtime.config import EngineConfig, GeneratedImage
from qwenserve.runtime.processor import load_processor
from qwenserve.runtime.progress import quiet_progress
from qwenserve.runtime.residency import Residency
from qwenserve.runtime.schedulers import scheduler_for
from qwenserve.runtime.sizes import SizePlan, plan_size
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


def _parameter_bytes(pipe: Pipeline) -> int:
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in itertools.chain(component.parameters(), component.buffers()):
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class _Resident:
    """One loaded base pipeline and what the engine loaded into it."""

    key: str
    kind: PipelineKind
    pipe: Pipeline
    stock_scheduler: dict[str, Any]
    adapters: dict[LoraSource, str] = field(default_factory=dict)
    """Recipe LoRAs kept loaded: source → adapter name."""


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
        self._residency: Residency[_Resident] = Residency(
            max_items=config.resident_models,
            max_bytes=(
                int(config.resident_memory_gb * 2**30)
                if config.resident_memory_gb is not None
                else None
            ),
            size_of=lambda resident: _parameter_bytes(resident.pipe),
        )
        self._job_counter = itertools.count(1)

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
        return (
            f"qwenserve engine: {weights}; device {self.device.type}, {dtype}; "
            f"up to {self.config.resident_models} resident pipeline(s)"
        )

    def resident(self) -> list[str]:
        """Residency keys (base weight ids) currently loaded, least recently used first."""
        with self._lock:
            return self._residency.keys()

    # --- loading ------------------------------------------------------------------------------
    def _weights(self) -> WeightSource:
        if self._source is None:
            self._source = weight_source(self.config.weights, self.config.cache_dir)
        return self._source

    def load(self, slug: str) -> None:
        """Make ``slug``'s base pipeline (and its recipe LoRAs) resident, as a warm-up."""
        recipe = get_model(slug).recipe
        with self._lock:
            resident = self._resident_for(recipe)
            if recipe.lightning is not None:
                self._recipe_adapter(resident, recipe.lightning, field="lora")
            for source in recipe.preset_loras.values():
                self._recipe_adapter(resident, source, field="lora")

    def _resident_for(self, recipe: Recipe) -> _Resident:
        key = recipe.base_weights
        resident = self._residency.get(key)
        if resident is not None:
            return resident
        # Free the old pipeline before loading the new one: two large bases may not fit at once.
        evicted_keys = [old_key for old_key, _old in self._residency.make_room()]
        if evicted_keys:
            log.info("evicted pipeline(s) %s (least recently used)", ", ".join(evicted_keys))
            self._release_memory()
        resident = self._load_pipeline(recipe)
        evicted_keys = [old_key for old_key, _old in self._residency.put(key, resident)]
        if evicted_keys:
            log.info("evicted pipeline(s) %s (memory budget)", ", ".join(evicted_keys))
            self._release_memory()
        return resident

    def _load_pipeline(self, recipe: Recipe) -> _Resident:
        started = time.perf_counter()
        source = self._weights()
        location = source.base_location(recipe.base_weights, recipe.pipeline)
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        try:
            if recipe.pipeline is not PipelineKind.TEXT_TO_IMAGE:
                # The stock processor needs torchvision; ours loads the same files without it.
                kwargs["processor"] = load_processor(location)
            with quiet_progress():
                pipe = DiffusionPipeline.from_pretrained(location, **kwargs)
            pipe.to(self.device)
        except QwenServeError:
            raise
        except Exception as error:
            raise InferenceError(
                f"could not load {recipe.base_weights} from {location}: {error}"
            ) from error
        pipe.set_progress_bar_config(disable=True)
        resident = _Resident(
            key=recipe.base_weights,
            kind=recipe.pipeline,
            pipe=pipe,
            stock_scheduler=dict(pipe.scheduler.config),
        )
        log.info(
            "loaded %s (%s) from %s in %.2fs",
            recipe.base_weights,
            type(pipe).__name__,
            location,
            time.perf_counter() - started,
        )
        return resident

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- adapters -----------------------------------------------------------------------------
    def _load_adapter(self, resident: _Resident, path: Path, name: str, *, field: str) -> None:
        """Load ``path`` as adapter ``name``; InvalidInput(field) when it is not a LoRA for it."""
        pipe = resident.pipe
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
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
    def _loaded_adapters(resident: _Resident) -> set[str]:
        names = resident.pipe.get_list_adapters()
        return {name for per_component in names.values() for name in per_component}

    def _drop_adapters(self, resident: _Resident, names: Sequence[str]) -> None:
        present = [n for n in names if n in self._loaded_adapters(resident)]
        if present:
            resident.pipe.delete_adapters(present)

    def _recipe_adapter(self, resident: _Resident, source: LoraSource, *, field: str) -> str:
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

    def _activate(
        self, resident: _Resident, names: Sequence[str], weights: Sequence[float]
    ) -> None:
        """Exactly ``names`` active for this call; none active leaves the base model exact."""
        pipe = resident.pipe
        if not self._loaded_adapters(resident):
            return
        if names:
            pipe.enable_lora()
            pipe.set_adapters(list(names), adapter_weights=list(weights))
        else:
            pipe.disable_lora()

    # --- sizes --------------------------------------------------------------------------------
    def output_size(
        self, request: GenerationRequest, input_sizes: Sequence[tuple[int, int]]
    ) -> tuple[int, int]:
        """The (width, height) ``generate`` returns for ``request`` with inputs of these sizes."""
        plan = plan_size(request, get_model(request.slug).recipe, input_sizes, tiny=self.is_tiny)
        return plan.width, plan.height

    # --- generation ---------------------------------------------------------------------------
    def _call_kwargs(
        self,
        request: GenerationRequest,
        recipe: Recipe,
        images: Sequence[Image.Image],
        plan: SizePlan,
    ) -> dict[str, Any]:
        prompt = request.prompt
        if request.lora is not None:
            preset = recipe.preset_loras.get(request.lora)
            if preset is None:
                raise InvalidInput(f"unknown preset LoRA {request.lora!r}", field="lora")
            if preset.trigger:
                prompt = f"{preset.trigger}{prompt}"
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "num_inference_steps": request.steps,
            "width": plan.generate_width,
            "height": plan.generate_height,
            "generator": torch.Generator(device="cpu").manual_seed(request.seed),
            "output_type": "np",
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
        if request.guidance > 1.0:
            # True CFG runs only with a negative prompt; " " is what the official examples send.
            negative = request.negative_prompt
            kwargs["true_cfg_scale"] = request.guidance
            kwargs["negative_prompt"] = negative if negative and negative.strip() else " "
        else:
            kwargs["true_cfg_scale"] = 1.0
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
            resident.pipe.scheduler = scheduler_for(
                recipe.scheduler, request.steps, resident.stock_scheduler
            )
            plan = plan_size(request, recipe, [i.size for i in images], tiny=self.is_tiny)
            kwargs = self._call_kwargs(request, recipe, images, plan)
            return PreparedCall(resident.pipe, kwargs, plan)

    def _recipe_adapters_for(
        self, resident: _Resident, recipe: Recipe, request: GenerationRequest
    ) -> tuple[list[str], list[float]]:
        names: list[str] = []
        weights: list[float] = []
        if recipe.scheduler is SchedulerKind.LIGHTNING and recipe.lightning is not None:
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
        InferenceError for engine failures: out of memory, NaN output, cancellation
        ("cancelled"), weights that cannot be loaded.
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
                resident.pipe.scheduler = scheduler_for(
                    recipe.scheduler, request.steps, resident.stock_scheduler
                )
                plan = plan_size(request, recipe, [i.size for i in images], tiny=self.is_tiny)
                kwargs = self._call_kwargs(request, recipe, images, plan)
                pixels = self._run(resident.pipe, kwargs, request.steps, on_step, should_cancel)
            finally:
                if job_names:
                    # Recipe adapters only, then delete: nothing of this job reaches the next.
                    self._activate(resident, names, weights)
                    self._drop_adapters(resident, job_names)
            elapsed_s = time.perf_counter() - started
        image = _to_image(pixels, plan)
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

    def _run(
        self,
        pipe: Pipeline,
        kwargs: dict[str, Any],
        total_steps: int,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> np.ndarray[Any, Any]:
        cancelled = False

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

        try:
            output = pipe(**kwargs, callback_on_step_end=step_end)
        except torch.OutOfMemoryError as error:
            self._release_memory()
            raise InferenceError("out of memory while generating; try a smaller size") from error
        except QwenServeError:
            raise
        except Exception as error:
            raise InferenceError(f"generation failed: {type(error).__name__}: {error}") from error
        if cancelled:
            raise InferenceError("cancelled")
        pixels: np.ndarray[Any, Any] = np.asarray(output.images[0])
        if not np.isfinite(pixels).all():
            raise InferenceError("the model produced NaN/inf values; the image was discarded")
        return pixels


def _to_image(pixels: np.ndarray[Any, Any], plan: SizePlan) -> Image.Image:
    """Float [0, 1] HxWx3 → RGB image, center-cropped to the planned size."""
    array = (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)
    image = Image.fromarray(array, mode="RGB") if array.ndim == 3 else Image.fromarray(array)
    image = image.convert("RGB")
    if image.size != (plan.width, plan.height):
        left = (image.width - plan.width) // 2
        top = (image.height - plan.height) // 2
        image = image.crop((left, top, left + plan.width, top + plan.height))
    return image
