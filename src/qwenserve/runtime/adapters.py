"""LoRA adapters by name on a resident pipeline: the one place that loads, switches and drops them.

A recipe's own LoRAs (Lightning, presets) are loaded once per resident pipeline, named after
their source, and switched on only for the calls that use them. A job's extra LoRAs are loaded
for that call alone and deleted in a ``finally``, so one job's adapters never reach the next.
With ``fuse_lightning`` the Lightning LoRA is fused into the weights instead (``fuse``).
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from qwenserve.catalog import GenerationRequest, LoraSource, Recipe, SchedulerKind
from qwenserve.errors import InferenceError, InvalidInput
from qwenserve.runtime.lora_check import read_lora
from qwenserve.runtime.resident import Resident
from qwenserve.runtime.weights import WeightSource

# peft warns on every second adapter of a model; several named adapters is exactly the design.
warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)

ADAPTER_PREFIX = "qs_"
"""Prefix of every adapter name: names that are nn.Module attributes (e.g. "train") crash."""


def adapter_name_for(source: LoraSource) -> str:
    """A recipe LoRA's adapter name: stable per file, so each pipeline loads it once."""
    digest = hashlib.sha256(f"{source.repo}/{source.filename}".encode()).hexdigest()[:12]
    return f"{ADAPTER_PREFIX}{digest}"


def loaded_adapters(resident: Resident) -> set[str]:
    """Adapter names loaded into any component of ``resident``'s pipeline."""
    names = resident.pipe.get_list_adapters()
    return {name for per_component in names.values() for name in per_component}


def drop_adapters(resident: Resident, names: Sequence[str]) -> None:
    """Delete those of ``names`` that are loaded (a failed load may have left none)."""
    present = [n for n in names if n in loaded_adapters(resident)]
    if present:
        resident.active = None
        resident.pipe.delete_adapters(present)


def activate(resident: Resident, names: Sequence[str], weights: Sequence[float]) -> None:
    """Exactly ``names`` active for this call; none active leaves the base model exact.

    Setting adapters walks every LoRA layer (milliseconds per call); when the last call
    left exactly these active, nothing is done."""
    wanted = (tuple(names), tuple(weights))
    if resident.active == wanted:
        return
    pipe = resident.pipe
    if loaded_adapters(resident):
        if names:
            pipe.enable_lora()
            pipe.set_adapters(list(names), adapter_weights=list(weights))
        else:
            pipe.disable_lora()
    resident.active = wanted


def load_adapter(resident: Resident, path: Path, name: str, *, field: str) -> None:
    """Load ``path`` as adapter ``name``; InvalidInput(field) when it is not a LoRA for it,
    InferenceError when the device runs out of memory loading it."""
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
        drop_adapters(resident, [name])
        raise InferenceError(f"out of memory loading LoRA {path.name}") from error
    except Exception as error:
        drop_adapters(resident, [name])
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise InvalidInput(
            f"{field}: not a LoRA for {resident.key}: {reason}", field=field
        ) from error
    if name not in loaded_adapters(resident):
        raise InvalidInput(
            f"{field}: the file holds no LoRA weights for {resident.key}'s transformer",
            field=field,
        )


class Adapters:
    """The engine's adapters: recipe LoRAs from its weight source, and per-job names."""

    def __init__(self, weights: Callable[[], WeightSource]) -> None:
        self._weights = weights
        self._jobs = itertools.count(1)

    def recipe_adapter(self, resident: Resident, source: LoraSource, *, field: str) -> str:
        """The adapter name of a recipe LoRA, loading it into the resident pipeline once."""
        name = resident.adapters.get(source)
        if name is None:
            path = self._weights().lora_file(source, resident.key, resident.kind)
            name = adapter_name_for(source)
            try:
                load_adapter(resident, path, name, field=field)
            except InvalidInput as error:
                # A recipe LoRA that does not fit its base is a deployment error, not the client's.
                raise InferenceError(f"recipe LoRA {source.repo}: {error.message}") from error
            resident.adapters[source] = name
        return name

    def load_recipe(self, resident: Resident, recipe: Recipe) -> None:
        """Load every LoRA ``recipe`` may switch on (a warm-up: no call pays for it later)."""
        if recipe.lightning is not None and resident.fused is None:
            self.recipe_adapter(resident, recipe.lightning, field="lora")
        for source in recipe.preset_loras.values():
            self.recipe_adapter(resident, source, field="lora")

    def for_request(
        self, resident: Resident, recipe: Recipe, request: GenerationRequest
    ) -> tuple[list[str], list[float]]:
        """The recipe adapters (names, weights) ``request`` runs with, loaded if need be:
        Lightning unless fused, and the preset LoRA it names."""
        names: list[str] = []
        weights: list[float] = []
        if (
            recipe.scheduler is SchedulerKind.LIGHTNING
            and recipe.lightning is not None
            and resident.fused is None
        ):
            names.append(self.recipe_adapter(resident, recipe.lightning, field="lora"))
            weights.append(recipe.lightning.weight)
        if request.lora is not None and request.lora in recipe.preset_loras:
            preset = recipe.preset_loras[request.lora]
            names.append(self.recipe_adapter(resident, preset, field="lora"))
            weights.append(preset.weight)
        return names, weights

    def fuse(self, resident: Resident, source: LoraSource) -> None:
        """Fuse ``source`` into the transformer's weights and drop the adapter layers."""
        name = self.recipe_adapter(resident, source, field="lora")
        pipe = resident.pipe
        pipe.fuse_lora(components=["transformer"], lora_scale=source.weight, adapter_names=[name])
        pipe.unload_lora_weights()  # keeps the fused weights; only the adapter layers go
        resident.active = None
        resident.adapters.pop(source, None)
        resident.fused = source

    @contextmanager
    def active(
        self,
        resident: Resident,
        recipe_adapters: tuple[list[str], list[float]],
        request: GenerationRequest,
        extra_loras: Sequence[Path] = (),
    ) -> Iterator[None]:
        """Within the block, the recipe adapters and ``extra_loras`` (local files in
        ``request.extra_loras`` order, weight 1) are exactly the active ones; on leaving it the
        job's adapters are deleted, whatever happened.

        Raises InvalidInput naming the request field of an extra file that is not a LoRA here.
        """
        names, weights = recipe_adapters
        job_names: list[str] = []
        try:
            job = next(self._jobs)
            for index, path in enumerate(extra_loras):
                ref_field = (
                    request.extra_loras[index].field
                    if index < len(request.extra_loras)
                    else f"lora_{index + 2}_url"
                )
                name = f"{ADAPTER_PREFIX}job{job}_{index}"
                job_names.append(name)
                load_adapter(resident, Path(path), name, field=ref_field)
            activate(resident, names + job_names, weights + [1.0] * len(job_names))
            yield
        finally:
            if job_names:
                # Recipe adapters only, then delete: nothing of this job reaches the next.
                activate(resident, names, weights)
                drop_adapters(resident, job_names)
