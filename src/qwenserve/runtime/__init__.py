"""The model engine: the only package that imports torch, diffusers, transformers and peft.

``Engine`` turns a validated ``GenerationRequest`` into a PIL image on the diffusers Qwen-Image
pipelines. Importing this package is cheap; torch loads when ``Engine`` is first touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwenserve.runtime.config import EngineConfig, GeneratedImage

if TYPE_CHECKING:
    from qwenserve.runtime.engine import Engine

__all__ = ["Engine", "EngineConfig", "GeneratedImage"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from qwenserve.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
