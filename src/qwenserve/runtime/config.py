"""The engine's settings and its result: plain data, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from qwenserve.config import DEFAULT_DATA_DIR


@dataclass(frozen=True)
class EngineConfig:
    """How an Engine finds weights and where it runs them.

    ``weights``: "tiny" (random weights built locally: images are noise), "hub" (Hugging Face ids
    through the HF cache) or a folder holding ``<org>/<name>`` pipelines and ``<repo>/<file>``
    LoRAs. ``cache_dir`` holds the tiny preset (``cache_dir/"tiny-v1"``). ``dtype`` "auto" is
    bfloat16 on CUDA and float32 elsewhere. At most ``resident_models`` base pipelines (and, when
    set, about ``resident_memory_gb`` of parameters) stay loaded, least recently used evicted.
    """

    weights: str = "tiny"
    cache_dir: Path = field(default_factory=lambda: DEFAULT_DATA_DIR / "cache")
    device: str = "auto"
    dtype: str = "auto"
    resident_models: int = 2
    resident_memory_gb: float | None = None


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image (RGB, exactly width x height) and how it was made."""

    image: Image.Image
    seed: int
    width: int
    height: int
    inference_time_s: float
