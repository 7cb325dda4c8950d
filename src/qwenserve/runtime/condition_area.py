"""A smaller condition-image area for the edit pipelines, for the tiny preset only.

Both edit pipelines VAE-encode every input image at about 1 MP, through a module-level
``calculate_dimensions(target_area, ratio)`` with the area hard-coded at the call site. On the
tiny preset that encode is most of an edit's time and buys nothing (the images are noise), so a
tiny call caps the area. The cap must not reach a real-weights call running at the same time in
another thread of the same process: the modules' function is swapped for a wrapper only while at
least one capped call runs (a lock and a counter), and the wrapper caps only for the threads that
asked for it (a thread-local depth). Where a diffusers version lacks the name, nothing is wrapped.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

EDIT_MODULES = (
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus",
)
FUNCTION_NAME = "calculate_dimensions"

_lock = threading.Lock()
_active_calls = 0
_originals: dict[str, Callable[..., Any]] = {}
_per_thread = threading.local()


def _capped(original: Callable[..., Any]) -> Callable[..., Any]:
    def calculate_dimensions(target_area: float, ratio: float) -> Any:
        cap_px = getattr(_per_thread, "max_area_px", None)
        if cap_px is not None:
            target_area = min(target_area, cap_px)
        return original(target_area, ratio)

    return calculate_dimensions


def _modules() -> list[ModuleType]:
    found = []
    for name in EDIT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, FUNCTION_NAME, None)):
            found.append(module)
    return found


@contextlib.contextmanager
def capped_condition_area(max_area_px: int) -> Iterator[None]:
    """Within the block, this thread's edit calls size their condition images to at most
    ``max_area_px`` pixels; other threads keep the pipelines' own sizes."""
    global _active_calls
    with _lock:
        if _active_calls == 0:
            for module in _modules():
                original = getattr(module, FUNCTION_NAME)
                _originals[module.__name__] = original
                setattr(module, FUNCTION_NAME, _capped(original))
        _active_calls += 1
    previous = getattr(_per_thread, "max_area_px", None)
    _per_thread.max_area_px = max_area_px if previous is None else min(previous, max_area_px)
    try:
        yield
    finally:
        _per_thread.max_area_px = previous
        with _lock:
            _active_calls -= 1
            if _active_calls == 0:
                for module_name, original in _originals.items():
                    setattr(importlib.import_module(module_name), FUNCTION_NAME, original)
                _originals.clear()


def is_wrapped() -> bool:
    """True while any thread holds a capped call (for tests)."""
    with _lock:
        return _active_calls > 0
