"""Loading a base pipeline component by component: concurrently, straight to the device, timed.

``DiffusionPipeline.from_pretrained`` loads the text encoder, the transformer and the VAE one
after the other, each to the CPU, and the whole pipeline is moved to the GPU afterwards (peers
spend most of a launch there: the 7-8B encoder, then the 20B DiT). Here each component is loaded
by its own class's ``from_pretrained`` from the same folder (a weights folder, the tiny preset,
or the hub snapshot ``DiffusionPipeline.download`` resolves through the HF cache), with
``device_map`` set to the device where it ends up, so safetensors land there directly; then the
pipeline is assembled from the loaded parts by ``DiffusionPipeline.from_pretrained`` itself.

Concurrency, and why it is ordered: the libraries change process-wide state while they *build*
a model (the default dtype; diffusers/accelerate replace ``nn.Module.register_parameter`` and
``torch.nn.init``'s functions; transformers sets parameters through ``register_parameter`` while
it loads). Two builds at once, or a diffusers build during a transformers load, could leave
those patched for good or put a loaded weight on the meta device. So: diffusers' models load
in one thread (the VAE, then the transformer), the transformers models (text encoder) in a
second one that starts once diffusers has *built* its models (seen at the exit of
``accelerate.init_empty_weights``; where that is not seen, after diffusers' whole lane: one
after the other, never wrong), the small parts (tokenizer, scheduler) on the calling thread;
the default dtype is pinned to the load dtype meanwhile and every patched global is checked
and restored afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("qwenserve.runtime")

_LOCK = threading.Lock()
"""One concurrent load at a time: the global state it pins is process-wide."""


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None where it cannot be read."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@dataclass(frozen=True)
class LoadTimings:
    """Where the time of one pipeline load went, in seconds (logged once per load).

    ``components_s``: each component's own ``from_pretrained`` (text encoder, transformer, VAE,
    tokenizer, scheduler, ...; concurrent ones overlap). ``load_s``: wall time until the
    assembled pipeline existed. ``lora_fuse_s``: the engine's preparation (fusing the Lightning
    LoRA with ``fuse_lightning``). ``fast_paths_s``: quantisation, step cache, compile hooks and
    the move to the device. ``warm_up_s``: the warm-up call(s) (``Engine.warm_up``), None until
    one ran. ``ready_after_start_s``: the process's age when the pipeline was ready (after the
    warm-up when one ran): time from process start to the first image.
    """

    key: str
    components_s: Mapping[str, float]
    load_s: float
    concurrent: bool
    shared: tuple[str, ...] = ()
    lora_fuse_s: float = 0.0
    fast_paths_s: float = 0.0
    warm_up_s: float | None = None
    ready_after_start_s: float | None = None

    @property
    def total_s(self) -> float:
        """Load, preparation, fast paths and warm-up together."""
        return self.load_s + self.lora_fuse_s + self.fast_paths_s + (self.warm_up_s or 0.0)

    def describe(self) -> str:
        """One log line: every figure, components slowest first."""
        parts = ", ".join(
            f"{name} {seconds:.2f}s"
            for name, seconds in sorted(self.components_s.items(), key=lambda item: -item[1])
        )
        text = (
            f"{self.key}: loaded in {self.load_s:.2f}s "
            f"({'concurrently' if self.concurrent else 'one after the other'}: {parts}"
            + (f"; shared {', '.join(self.shared)}" if self.shared else "")
            + f"), LoRA fuse {self.lora_fuse_s:.2f}s, fast paths {self.fast_paths_s:.2f}s"
        )
        if self.warm_up_s is not None:
            text += f", warm-up {self.warm_up_s:.2f}s"
        if self.ready_after_start_s is not None:
            text += f"; ready {self.ready_after_start_s:.2f}s after process start"
        return text


def local_folder(location: str) -> Path:
    """``location`` as a folder: itself, or the hub repo's snapshot in the HF cache (downloaded
    where the network and ``HF_HUB_OFFLINE`` allow, as ``from_pretrained`` would)."""
    path = Path(location)
    if path.is_dir():
        return path
    from diffusers import DiffusionPipeline

    return Path(DiffusionPipeline.download(location))


@dataclass
class _Gate:
    """Set once the diffusers lane has built all its models (or ended)."""

    builds_left: int
    thread: int | None = None
    event: threading.Event = field(default_factory=threading.Event)


def _component_class(library: str, class_name: str) -> Any:
    return getattr(importlib.import_module(library), class_name)


def _loader(
    folder: Path,
    name: str,
    library: str,
    class_name: str,
    dtype: torch.dtype,
    device_map: str | None,
) -> Callable[[], Any]:
    klass = _component_class(library, class_name)
    kwargs: dict[str, Any] = {}
    if isinstance(klass, type) and issubclass(klass, torch.nn.Module):
        kwargs["dtype" if library == "transformers" else "torch_dtype"] = dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
    return lambda: klass.from_pretrained(str(folder / name), **kwargs)


def _is_module(library: str, class_name: str) -> bool:
    klass = _component_class(library, class_name)
    return isinstance(klass, type) and issubclass(klass, torch.nn.Module)


def load_components(
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | None,
    on_host: frozenset[str] = frozenset(),
    skip: frozenset[str] = frozenset(),
    concurrent: bool = True,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Load every component ``folder/model_index.json`` names, except ``skip`` (provided by the
    caller); returns (components by name, seconds by name).

    Modules go straight to ``device`` (``device_map``) unless ``device`` is None (CPU offload)
    or their name is in ``on_host`` (kept on the CPU: the transformer that fp8 quantisation
    converts before it is moved). ``concurrent`` False loads them one after the other, in the
    index's order (what ``from_pretrained`` does), for comparison.
    """
    index = json.loads((folder / "model_index.json").read_text())
    specs = [
        (name, value[0], value[1])
        for name, value in index.items()
        if not name.startswith("_")
        # A component is [library, class]; other lists are pipeline config (Turbo's
        # ``sample_sigmas`` grid), which ``from_pretrained`` reads itself.
        and isinstance(value, list)
        and len(value) == 2
        and all(isinstance(part, str) for part in value)
        and name not in skip
    ]
    timings: dict[str, float] = {}
    loaded: dict[str, Any] = {}

    def run(name: str, load: Callable[[], Any]) -> None:
        started = time.perf_counter()
        loaded[name] = load()
        timings[name] = time.perf_counter() - started

    def loader(name: str, library: str, class_name: str) -> Callable[[], Any]:
        on_device = device is not None and name not in on_host
        device_map = str(device) if on_device and device is not None else None
        return _loader(folder, name, library, class_name, dtype, device_map)

    if not concurrent:
        for name, library, class_name in specs:
            run(name, loader(name, library, class_name))
        return loaded, timings

    modules = [s for s in specs if _is_module(s[1], s[2])]
    # diffusers' models in one lane, the transformer last (the others are built before it).
    diffusers_lane = sorted(
        (s for s in modules if s[1] == "diffusers"), key=lambda s: s[0] == "transformer"
    )
    other_lane = [s for s in modules if s[1] != "diffusers"]
    small = [s for s in specs if s not in modules]
    gate = _Gate(builds_left=len(diffusers_lane))

    def diffusers_work() -> None:
        gate.thread = threading.get_ident()
        try:
            for name, library, class_name in diffusers_lane:
                run(name, loader(name, library, class_name))
        finally:
            gate.event.set()

    def other_work() -> None:
        gate.event.wait()
        for name, library, class_name in other_lane:
            run(name, loader(name, library, class_name))

    with (
        _LOCK,
        _globals_restored(dtype),
        _builds_counted(gate),
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="load") as pool,
    ):
        futures: list[Future[None]] = [pool.submit(diffusers_work), pool.submit(other_work)]
        for name, library, class_name in small:
            run(name, loader(name, library, class_name))
        for future in futures:
            future.result()
    return loaded, timings


@contextlib.contextmanager
def _builds_counted(gate: _Gate) -> Iterator[None]:
    """Count the diffusers lane's model builds (``accelerate.init_empty_weights`` exits) and
    open ``gate`` after the last one. Without accelerate the gate opens at the lane's end."""
    try:
        import accelerate
    except ImportError:
        yield
        return
    original = accelerate.init_empty_weights

    @contextlib.contextmanager
    def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with original(*args, **kwargs) as value:
            yield value
        if threading.get_ident() == gate.thread:
            gate.builds_left -= 1
            if gate.builds_left <= 0:
                gate.event.set()

    accelerate.init_empty_weights = counted
    try:
        yield
    finally:
        accelerate.init_empty_weights = original


@contextlib.contextmanager
def _globals_restored(dtype: torch.dtype) -> Iterator[None]:
    """Pin the default dtype to ``dtype`` (every library sets it to that while it builds, so
    nested saves and restores agree), and afterwards put back what the libraries patch
    process-wide, logging any that was left changed."""
    init = torch.nn.init
    init_functions = tuple(
        n for n, f in vars(init).items() if not n.startswith("_") and callable(f)
    )
    saved: dict[tuple[Any, str], Any] = {
        (owner, name): getattr(owner, name)
        for owner, names in (
            (torch.nn.Module, ("register_parameter", "register_buffer")),
            (torch, ("linspace",)),
            (init, init_functions),
        )
        for name in names
    }
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(default_dtype)
        for (owner, name), value in saved.items():
            if getattr(owner, name) is not value:
                log.warning("loading left %s.%s patched; restored", owner.__name__, name)
                setattr(owner, name, value)
