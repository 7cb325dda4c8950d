"""Resident base pipelines: planned before they load, parts shared by content, LRU out.

``ResidentPipelines`` owns the path from "the engine needs base X" to a ready pipeline object:
it estimates X's bytes from its files (``footprint.py``), evicts least recently used pipelines
until X fits the count cap and the byte budget (``memory_plan.py``) *before* loading it, loads
X with the text encoder and VAE modules a resident pipeline already holds when their files are
identical (decided by content hash, never by name), and measures what X really holds once
loaded. Components load concurrently and straight to the device (``loading.py``); where fp8
quantisation is on, the transformer stays on the CPU until it is quantized, so the device never
holds its full-precision copy. Each load's ``LoadTimings`` is logged once and kept. A shared
module stays while any resident pipeline uses it. Not with CPU offload, whose hooks belong to
one pipeline, nor for random-full (no files to compare).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from qwenserve.catalog import LoraSource, PipelineKind, Recipe, SchedulerKind
from qwenserve.errors import InferenceError, QwenServeError
from qwenserve.runtime.cfg_batch import CfgBatcher
from qwenserve.runtime.compile import CompileStats
from qwenserve.runtime.config import EngineConfig, quantize_mode
from qwenserve.runtime.cpu_kernels import use_fast_vae_norms
from qwenserve.runtime.fast_paths import apply_fast_paths
from qwenserve.runtime.footprint import (
    ContentHashes,
    folder_footprint,
    hub_snapshot,
    pipeline_footprint,
)
from qwenserve.runtime.loading import LoadTimings, load_components, local_folder, process_age_s
from qwenserve.runtime.memory_plan import (
    GIB,
    Footprint,
    MemoryBudget,
    held_bytes,
    plan_load,
    plan_trim,
    wants_vae_tiling,
)
from qwenserve.runtime.processor import load_processor, load_processor_21
from qwenserve.runtime.progress import quiet_progress
from qwenserve.runtime.weights import WeightSource

log = logging.getLogger("qwenserve.runtime")

Pipeline = Any  # diffusers' pipelines are only partly typed


@dataclass
class Resident:
    """One loaded base pipeline and what the engine loaded into it."""

    key: str
    kind: PipelineKind
    pipe: Pipeline
    stock_scheduler: dict[str, Any]
    adapters: dict[LoraSource, str] = field(default_factory=dict)
    """Recipe LoRAs kept loaded: source → adapter name."""
    fused: LoraSource | None = None
    """The Lightning LoRA fused into this pipeline's weights (``fuse_lightning``), if any."""
    warmed: set[str] = field(default_factory=set)
    """Slugs whose variants were compiled (``compile``; ``runtime/compile.py``)."""
    active: tuple[tuple[str, ...], tuple[float, ...]] | None = None
    """Adapters (names, weights) set active by the last call; None: unknown, set them again."""
    schedulers: dict[tuple[SchedulerKind, bool], Any] = field(default_factory=dict)
    """One scheduler per (kind, one step): set_timesteps resets it at every call."""
    cfg: CfgBatcher | None = None
    """Runs CFG's two passes as one batch (``cfg_batch``), where it applies."""
    footprint: Footprint = field(default_factory=Footprint)
    """What it holds, measured after loading (shared parts carry their content id)."""
    timings: LoadTimings | None = None
    """Where its load's time went (``loading.py``)."""


@dataclass
class _SharedModule:
    module: Any
    users: set[str]


def cuda_free_bytes() -> int:
    """Free CUDA memory now, counting what torch's allocator keeps cached but unused (this
    process can reuse it)."""
    free, _total = torch.cuda.mem_get_info()
    return int(free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())


def device_budget(config: EngineConfig, device: torch.device) -> MemoryBudget:
    """The budget ``config`` asks for on ``device``: free CUDA memory bounds it only when the
    pipelines live on the GPU (not with CPU offload)."""
    on_gpu = device.type == "cuda" and not config.cpu_offload
    return MemoryBudget.from_gb(
        config.resident_memory_gb,
        config.memory_margin_gb,
        cuda_free_bytes if on_gpu else None,
    )


class ResidentPipelines:
    """Base pipelines kept loaded under ``config.resident_models`` and a ``MemoryBudget``.

    One engine thread uses it at a time (the engine's lock).
    """

    def __init__(
        self,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        source: Callable[[], WeightSource],
        budget: MemoryBudget,
        compile_stats: CompileStats | None = None,
        *,
        concurrent_load: bool = True,
    ) -> None:
        self.config = config
        self.concurrent_load = concurrent_load
        """False: components load one after the other (for comparison, ``bench/cold_start.py``)."""
        self.load_timings: list[LoadTimings] = []
        """Every load's timings, oldest first (``Engine.load_timings``)."""
        self.compile_stats = compile_stats or CompileStats()
        self.device = device
        self.dtype = dtype
        self.budget = budget
        self._source = source
        self._entries: OrderedDict[str, Resident] = OrderedDict()
        self.loads: Counter[str] = Counter()
        """Pipelines loaded, by residency key (for /metrics)."""
        self.evictions: Counter[str] = Counter()
        """Pipelines evicted, by residency key (for /metrics)."""
        self._shared: dict[str, _SharedModule] = {}
        self._estimates: dict[str, Footprint] = {}
        self._hashes = ContentHashes(config.cache_dir / "content-sha256.json")
        # Shared modules would carry one pipeline's offload hooks into another; random-full
        # has no files to compare.
        self.shares = not config.cpu_offload and config.weights != "random-full"

    def get(self, key: str) -> Resident | None:
        """The resident pipeline for ``key``, now the most recently used; None when not loaded."""
        resident = self._entries.get(key)
        if resident is not None:
            self._entries.move_to_end(key)
        return resident

    def keys(self) -> list[str]:
        """Resident keys, least recently used first."""
        return list(self._entries)

    def held_bytes(self) -> int:
        """Bytes the resident pipelines hold, each shared module once."""
        return held_bytes(r.footprint for r in self._entries.values())

    def load(self, key: str, recipe: Recipe, prepare: Callable[[Resident], None]) -> Resident:
        """Evict what the plan says, load ``recipe``'s base as ``key``, run ``prepare`` on it
        (the engine fuses LoRAs and wraps the transformer there), then the fast paths.

        Raises InferenceError when the weights cannot be loaded or prepared.
        """
        location = self._source().base_location(recipe.base_weights, recipe.pipeline)
        estimate = self._estimate(recipe, location)
        budget = self.budget.for_residents(self.held_bytes())
        plan = plan_load(
            estimate,
            [(k, r.footprint) for k, r in self._entries.items()],
            max_items=self.config.resident_models,
            budget_bytes=budget,
        )
        self._evict(plan.evict, keep=plan.shared, why="to fit the next load")
        if not plan.fits and budget is not None:
            log.warning(
                "%s needs ~%.1f GiB, over the %.1f GiB budget even alone; loading it anyway",
                key,
                plan.held_after / GIB,
                budget / GIB,
            )
        reuse = {
            part.name: self._shared[part.share_id].module
            for part in estimate.parts
            if part.share_id is not None and part.share_id in self._shared
        }
        try:
            resident = self._build(key, recipe, location, reuse)
            started = time.perf_counter()
            prepare(resident)
            fused = time.perf_counter()
            self._finish(resident)
            finished = time.perf_counter()
        except QwenServeError:
            self._drop_unused_shared()
            raise
        except Exception as error:
            self._drop_unused_shared()
            log.error("could not prepare %s: %s: %s", key, type(error).__name__, error)
            raise InferenceError(f"could not prepare the model {recipe.base_weights}") from error
        share_ids = {p.name: p.share_id for p in estimate.parts if p.share_id is not None}
        resident.footprint = pipeline_footprint(resident.pipe, share_ids)
        for name, share_id in share_ids.items():
            entry = self._shared.setdefault(
                share_id, _SharedModule(getattr(resident.pipe, name), set())
            )
            entry.users.add(key)
        self._entries[key] = resident
        self.loads[key] += 1
        if resident.timings is not None:
            resident.timings = dataclasses.replace(
                resident.timings,
                lora_fuse_s=fused - started,
                fast_paths_s=finished - fused,
                ready_after_start_s=process_age_s(),
            )
            self.load_timings.append(resident.timings)
            log.info("%s", resident.timings.describe())
        trim = plan_trim(
            [(k, r.footprint) for k, r in self._entries.items()],
            newest=key,
            budget_bytes=self.budget.for_residents(self.held_bytes()),
        )
        self._evict(trim, keep=frozenset(), why="over the memory budget once loaded")
        return resident

    def note_warm_up(self, key: str, seconds: float) -> None:
        """Add a warm-up of ``key`` to its load's timings (logged with them once more)."""
        resident = self._entries.get(key)
        if resident is None or resident.timings is None:
            return
        timings = dataclasses.replace(
            resident.timings,
            warm_up_s=(resident.timings.warm_up_s or 0.0) + seconds,
            ready_after_start_s=process_age_s(),
        )
        self.load_timings[self.load_timings.index(resident.timings)] = timings
        resident.timings = timings
        log.info("%s", timings.describe())

    def wants_vae_tiling(self, width: int, height: int, batch: int, held_bytes: int = 0) -> bool:
        """Whether a call decoding ``batch`` images of width x height should tile its decode,
        the call already holding ``held_bytes`` (2.1's prefix KV cache)."""
        return wants_vae_tiling(
            self.config.vae_tiling,
            width=width,
            height=height,
            batch=batch,
            dtype_bytes=self.dtype.itemsize,
            work_bytes=self.budget.for_work(),
            held_bytes=held_bytes,
            device_type=self.device.type,
        )

    def release_memory(self) -> None:
        """Return freed memory to the device (after an eviction or an out-of-memory error)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- internals ----------------------------------------------------------------------------
    def _estimate(self, recipe: Recipe, location: str) -> Footprint:
        """The footprint ``location`` will have once loaded, from its files; empty (checked
        after the load instead) where they cannot be read."""
        known = self._estimates.get(location)
        if known is not None:
            return known
        try:
            if self.config.weights == "random-full":
                from qwenserve.runtime.random_full import random_full_footprint

                estimate = random_full_footprint(self.dtype, recipe.pipeline)
            else:
                folder = hub_snapshot(location) if self.config.weights == "hub" else Path(location)
                if folder is None:
                    log.info("%s is not in the HF cache: its size is checked once loaded", location)
                    return Footprint()
                hashes = self._hashes if self.shares else None
                estimate = folder_footprint(folder, self.dtype.itemsize, hashes)
        except (OSError, ValueError, KeyError) as error:
            log.warning(
                "could not estimate %s from its files (%s); checked once loaded", location, error
            )
            return Footprint()
        self._estimates[location] = estimate
        return estimate

    def _build(self, key: str, recipe: Recipe, location: str, reuse: dict[str, Any]) -> Resident:
        started = time.perf_counter()
        components_s: dict[str, float] = {}
        quantizing = quantize_mode(self.config.quantize) != "none"
        try:
            if self.config.weights == "random-full":
                from qwenserve.runtime.random_full import build_random_full_pipeline

                # Built on the GPU already; ``apply_fast_paths`` places it as configured.
                pipe = build_random_full_pipeline(recipe.pipeline, recipe.base_weights, self.dtype)
            else:
                provided = dict(reuse)
                # The stock processors need torchvision; ours load the same files without it.
                if recipe.pipeline is PipelineKind.QWEN_IMAGE_21:
                    provided["processor"] = load_processor_21(location)
                elif recipe.pipeline is not PipelineKind.TEXT_TO_IMAGE:
                    provided["processor"] = load_processor(location)
                folder = local_folder(location)
                with quiet_progress():
                    components, components_s = load_components(
                        folder,
                        dtype=self.dtype,
                        device=None if self.config.cpu_offload else self.device,
                        # fp8: quantized on the CPU side, moved after (``apply_fast_paths``).
                        on_host=frozenset({"transformer"}) if quantizing else frozenset(),
                        skip=frozenset(provided),
                        concurrent=self.concurrent_load,
                    )
                    pipe = DiffusionPipeline.from_pretrained(str(folder), **components, **provided)
        except QwenServeError:
            raise
        except Exception as error:
            log.error("could not load %s from %s: %s", recipe.base_weights, location, error)
            raise InferenceError(f"could not load the model {recipe.base_weights}") from error
        pipe.set_progress_bar_config(disable=True)
        timings = LoadTimings(
            key=key,
            components_s=components_s,
            load_s=time.perf_counter() - started,
            concurrent=self.concurrent_load,
            shared=tuple(sorted(reuse)),
        )
        return Resident(
            key=key,
            kind=recipe.pipeline,
            pipe=pipe,
            stock_scheduler=dict(pipe.scheduler.config),
            timings=timings,
        )

    def _finish(self, resident: Resident) -> None:
        pipe = resident.pipe
        if self.device.type == "cpu" and getattr(pipe, "vae", None) is not None:
            use_fast_vae_norms(pipe.vae)  # rebinds the same forward: harmless on a shared VAE
        apply_fast_paths(pipe, self.config, self.device, self.compile_stats)

    def _evict(self, keys: Iterable[str], *, keep: frozenset[str], why: str) -> None:
        evicted = []
        for key in keys:
            resident = self._entries.pop(key, None)
            if resident is None:
                continue
            evicted.append(key)
            self.evictions[key] += 1
            for share_id in resident.footprint.share_ids():
                entry = self._shared.get(share_id)
                if entry is not None:
                    entry.users.discard(key)
        self._drop_unused_shared(keep)
        if evicted:
            log.info("evicted pipeline(s) %s (least recently used, %s)", ", ".join(evicted), why)
            self.release_memory()

    def _drop_unused_shared(self, keep: frozenset[str] = frozenset()) -> None:
        for share_id in [s for s, e in self._shared.items() if not e.users and s not in keep]:
            del self._shared[share_id]
