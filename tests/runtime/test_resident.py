"""Resident pipelines on the tiny preset: evicted before a load, text encoder and VAE shared when
(and only when) their files are identical, quantized weights counted at their real size."""

from __future__ import annotations

import gc
import importlib.util
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwenserve.catalog import get_model
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime import resident as resident_module
from qwenserve.runtime.footprint import folder_footprint, module_bytes
from qwenserve.runtime.memory_plan import GIB, MemoryBudget
from qwenserve.runtime.resident import Resident, ResidentPipelines
from qwenserve.runtime.tiny_preset import preset_root
from qwenserve.runtime.weights import weight_source
from tests.runtime.conftest import make_request, pixels

BASE = make_request("qwen-image", prompt="a", steps=2, seed=3, aspect_ratio="1:1")
OTHER = make_request("qwen-image-2512", prompt="a", steps=2, seed=3, width=256, height=256)


def _tiny_bytes(shared_cache: Path, slug: str) -> int:
    recipe = get_model(slug).recipe
    location = weight_source("tiny", shared_cache).base_location(
        recipe.base_weights, recipe.pipeline
    )
    return folder_footprint(Path(location), 4, None).total_bytes


def test_the_old_pipeline_is_freed_before_the_next_one_loads(
    shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = _tiny_bytes(shared_cache, "qwen-image")
    engine = Engine(
        EngineConfig(cache_dir=shared_cache, resident_models=4, resident_memory_gb=1.5 * one / GIB)
    )
    old = weakref.ref(engine.prepare_call(BASE).pipeline)
    alive_at_load: list[bool] = []
    load = resident_module.DiffusionPipeline.from_pretrained

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive_at_load.append(old() is not None)
        return load(*args, **kwargs)

    monkeypatch.setattr(resident_module.DiffusionPipeline, "from_pretrained", recording_load)
    engine.generate(OTHER)
    assert alive_at_load == [False]  # two would not fit: the first was gone before the load
    assert engine.resident() == ["Qwen/Qwen-Image-2512"]
    # What /metrics reports (through the worker's announcement).
    assert engine.pipeline_counts() == {
        "loads": {"Qwen/Qwen-Image": 1, "Qwen/Qwen-Image-2512": 1},
        "evictions": {"Qwen/Qwen-Image": 1},
    }
    assert engine.device_memory() == {}  # no CUDA here: no GPU figures


def test_free_device_memory_bounds_what_stays_resident(shared_cache: Path) -> None:
    # A pretend GPU with room for 2.75 tiny pipelines, half of one kept as the margin.
    one = _tiny_bytes(shared_cache, "qwen-image")
    config = EngineConfig(cache_dir=shared_cache, resident_models=4)
    source = weight_source("tiny", shared_cache)
    pipelines: ResidentPipelines

    def free_bytes() -> int:
        return int(2.75 * one) - pipelines.held_bytes()

    budget = MemoryBudget(fixed_bytes=None, margin_bytes=one // 2, free_bytes=free_bytes)
    pipelines = ResidentPipelines(
        config, torch.device("cpu"), torch.float32, lambda: source, budget
    )
    seen_at_load: list[list[str]] = []

    def note(resident: Resident) -> None:
        seen_at_load.append(pipelines.keys())

    for slug in ("qwen-image", "qwen-image-2512", "qwen-image-edit-fast"):
        recipe = get_model(slug).recipe
        pipelines.load(recipe.base_weights, recipe, note)
    assert seen_at_load == [[], ["Qwen/Qwen-Image"], ["Qwen/Qwen-Image-2512"]]
    assert pipelines.keys() == ["Qwen/Qwen-Image-2512", "Qwen/Qwen-Image-Edit"]
    assert pipelines.held_bytes() <= 2.25 * one


def _weights_folder(shared_cache: Path, tmp_path: Path, *, same_parts: bool) -> Path:
    """The tiny preset copied as an operator's weights folder; with ``same_parts`` the
    Qwen-Image-2512 base gets Qwen-Image's text encoder and VAE files (copies)."""
    Engine(EngineConfig(cache_dir=shared_cache)).load("qwen-image-2512")  # both bases built
    Engine(EngineConfig(cache_dir=shared_cache)).load("qwen-image")
    folder = tmp_path / "weights"
    shutil.copytree(preset_root(shared_cache), folder, ignore=shutil.ignore_patterns(".*"))
    if same_parts:
        for part in ("text_encoder", "vae"):
            target = folder / "Qwen/Qwen-Image-2512" / part
            shutil.rmtree(target)
            shutil.copytree(folder / "Qwen/Qwen-Image" / part, target)
    return folder


def test_identical_text_encoder_and_vae_files_load_once(shared_cache: Path, tmp_path: Path) -> None:
    folder = _weights_folder(shared_cache, tmp_path, same_parts=True)
    engine = Engine(EngineConfig(weights=str(folder), cache_dir=tmp_path / "c", resident_models=4))
    first = engine.prepare_call(BASE).pipeline
    second = engine.prepare_call(OTHER).pipeline
    assert second.text_encoder is first.text_encoder
    assert second.vae is first.vae
    assert second.transformer is not first.transformer
    # The same images as pipelines loaded apart from the same files.
    apart = Engine(EngineConfig(weights=str(folder), cache_dir=tmp_path / "d", resident_models=1))
    for request in (OTHER, BASE):
        assert np.array_equal(
            pixels(engine.generate(request).image), pixels(apart.generate(request).image)
        )
    # Evicting the pipeline that loaded them keeps them for the one still using them.
    one = Engine(EngineConfig(weights=str(folder), cache_dir=tmp_path / "c", resident_models=1))
    encoder = weakref.ref(one.prepare_call(BASE).pipeline.text_encoder)
    assert one.prepare_call(OTHER).pipeline.text_encoder is encoder()
    assert one.resident() == ["Qwen/Qwen-Image-2512"]


def test_differing_files_are_not_shared(shared_cache: Path, tmp_path: Path) -> None:
    folder = _weights_folder(shared_cache, tmp_path, same_parts=False)
    engine = Engine(EngineConfig(weights=str(folder), cache_dir=tmp_path / "c", resident_models=4))
    first = engine.prepare_call(BASE).pipeline
    second = engine.prepare_call(OTHER).pipeline
    assert second.text_encoder is not first.text_encoder
    assert second.vae is not first.vae


HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


@pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao")
def test_float8_weights_count_at_their_real_size() -> None:
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    assert module_bytes(layer) == 256 * 512 * 2
    quantize_(layer, Float8WeightOnlyConfig())
    weight: Any = layer.weight
    assert weight.dtype == torch.bfloat16 and weight.element_size() == 2  # what it reports
    # One byte per weight plus one float32 scale per output row.
    assert module_bytes(layer) == 256 * 512 * 1 + 512 * 4
