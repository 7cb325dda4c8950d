"""Fixtures: one tiny-preset engine per session, requests built through the real contract."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qwenserve.catalog import GenerationRequest, validate_request
from qwenserve.runtime import Engine, EngineConfig


@pytest.fixture(scope="session")
def engine(shared_cache: Path) -> Engine:
    """Every base resident at once, so each pipeline is loaded once per session."""
    return Engine(EngineConfig(weights="tiny", cache_dir=shared_cache, resident_models=4))


def make_request(slug: str, **body: Any) -> GenerationRequest:
    """A request validated exactly as the API validates it."""
    return validate_request(slug, body)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image, dtype=np.int16)


def assert_valid_image(image: Image.Image, width: int, height: int) -> None:
    """RGB, exactly the size asked for, and not a flat color."""
    assert image.mode == "RGB"
    assert image.size == (width, height)
    array = pixels(image)
    assert array.std() > 1.0, "image is (nearly) constant"
