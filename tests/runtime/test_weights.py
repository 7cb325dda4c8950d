"""Weights folders and residency: the tiny preset loads like real weights; LRU eviction."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from qwenserve.catalog import get_model
from qwenserve.errors import InferenceError
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.tiny_preset import preset_root
from tests.runtime.conftest import make_request, pixels


def test_a_weights_folder_loads_through_the_same_path(
    engine: Engine, shared_cache: Path, tmp_path: Path
) -> None:
    # An explicit size: the same on both (the tiny preset shrinks only ratio-derived sizes).
    request = make_request(
        "qwen-image-2512", prompt="a lantern", steps=2, seed=31, width=256, height=256
    )
    from_tiny = pixels(engine.generate(request).image)  # builds base and Lightning LoRA

    # A weights folder made the way an operator would: <org>/<name> and <repo>/<filename>.
    recipe = get_model("qwen-image-2512").recipe
    assert recipe.lightning is not None
    folder = tmp_path / "weights"
    shutil.copytree(preset_root(shared_cache) / recipe.base_weights, folder / recipe.base_weights)
    lora = Path(recipe.lightning.repo) / recipe.lightning.filename
    (folder / lora).parent.mkdir(parents=True)
    shutil.copy(preset_root(shared_cache) / lora, folder / lora)

    from_folder = Engine(EngineConfig(weights=str(folder), cache_dir=tmp_path / "unused"))
    assert not from_folder.is_tiny
    assert np.array_equal(pixels(from_folder.generate(request).image), from_tiny)
    # Nothing was built (the engine may cache file hashes there, for sharing).
    assert not (tmp_path / "unused" / "tiny-v1").exists()

    # A slug whose base the folder lacks: a clear error naming what is missing.
    with pytest.raises(InferenceError, match="Qwen/Qwen-Image-Edit"):
        from_folder.load("qwen-image-edit-fast")


def test_missing_weights_folder_is_a_clear_error(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(weights=str(tmp_path / "nowhere")))
    with pytest.raises(InferenceError, match="nowhere"):
        engine.load("qwen-image")


def test_lru_eviction_with_one_resident_model(shared_cache: Path) -> None:
    engine = Engine(EngineConfig(cache_dir=shared_cache, resident_models=1))
    assert engine.resident() == []
    engine.load("qwen-image")
    assert engine.resident() == ["Qwen/Qwen-Image"]
    engine.load("qwen-image-fast")  # same base: nothing to evict
    assert engine.resident() == ["Qwen/Qwen-Image"]
    request = make_request("qwen-image-2512", prompt="x", steps=1, seed=5, width=256, height=256)
    first = pixels(engine.generate(request).image)
    assert engine.resident() == ["Qwen/Qwen-Image-2512"]
    engine.load("qwen-image")
    assert engine.resident() == ["Qwen/Qwen-Image"]
    # Evicted and loaded again from disk: the same pipeline, the same pixels.
    assert np.array_equal(pixels(engine.generate(request).image), first)
    assert engine.resident() == ["Qwen/Qwen-Image-2512"]


def test_memory_budget_keeps_only_what_fits(shared_cache: Path) -> None:
    engine = Engine(
        EngineConfig(cache_dir=shared_cache, resident_models=4, resident_memory_gb=0.001)
    )
    engine.load("qwen-image")
    engine.load("qwen-image-2512")
    assert engine.resident() == ["Qwen/Qwen-Image-2512"]  # 1 MB holds one tiny pipeline only
