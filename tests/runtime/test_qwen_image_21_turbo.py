"""``qwen-image-2.1-fast`` on ``Qwen/Qwen-Image-2.1-Turbo``: its own checkpoint, loaded from a
weights folder and from a Hugging Face cache laid out as published (tests/runtime/hub_layout_21.py),
sampling the fixed ``sample_sigmas`` grid of its ``model_index.json`` in 8 steps, and sharing
2.1's text encoder and VAE (identical files) when both slugs are served."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants

from qwenserve.catalog import GenerationRequest, get_model
from qwenserve.catalog.models_21 import QWEN_IMAGE_21_BASE, QWEN_IMAGE_21_TURBO, TURBO_STEPS
from qwenserve.errors import InferenceError
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.memory_plan import MemoryBudget
from qwenserve.runtime.resident import ResidentPipelines
from qwenserve.runtime.weights import weight_source
from tests.runtime.conftest import make_request, pixels
from tests.runtime.hub_layout_21 import build_hub_pipeline_21, cache_snapshot

FAST = "qwen-image-2.1-fast"
REPOS = (QWEN_IMAGE_21_BASE, QWEN_IMAGE_21_TURBO)


def _fast(**body: object) -> GenerationRequest:
    """The fast slug's default request (no steps, no guidance: it takes neither)."""
    return make_request(FAST, prompt="a kite over the sea", seed=5, width=288, height=256, **body)


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An operator's weights folder holding both 2.1 repos in their published layout."""
    root = tmp_path_factory.mktemp("weights-21")
    for repo in REPOS:
        build_hub_pipeline_21(root, repo)
    return root


@pytest.fixture(scope="module")
def folder_engine(weights_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """``--weights PATH`` on that folder; its cache dir stays empty (nothing is built)."""
    unused = tmp_path_factory.mktemp("unused-cache")
    return Engine(EngineConfig(weights=str(weights_root), cache_dir=unused))


@pytest.fixture(scope="module")
def hub_cache(weights_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf-hub")
    for repo in REPOS:
        cache_snapshot(cache, repo, weights_root / repo)
    return cache


@pytest.fixture
def offline_hub(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``--weights hub`` with ``HF_HUB_OFFLINE=1`` and the cache above (no network at all)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield hub_cache


def _index(folder: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((folder / "model_index.json").read_text())
    return loaded


def test_the_published_turbo_folder_has_its_grid_and_2_1s_encoder_and_vae(
    weights_root: Path,
) -> None:
    turbo, base = weights_root / QWEN_IMAGE_21_TURBO, weights_root / QWEN_IMAGE_21_BASE
    index = _index(turbo)
    grid = index["sample_sigmas"]
    assert isinstance(grid, list) and len(grid) == TURBO_STEPS
    assert grid != list(np.linspace(1.0, 1.0 / TURBO_STEPS, TURBO_STEPS))  # its own grid
    assert "sample_sigmas" not in _index(base)
    assert {k: v for k, v in index.items() if k != "sample_sigmas"} == _index(base)
    for part, same in (("text_encoder", True), ("vae", True), ("transformer", False)):
        files = sorted(p.relative_to(turbo) for p in (turbo / part).glob("*.safetensors"))
        assert len(files) > 1, f"{part} is sharded as published"
        equal = all((turbo / f).read_bytes() == (base / f).read_bytes() for f in files)
        assert equal is same, part


def test_the_fast_slug_loads_turbo_from_a_weights_folder(
    engine: Engine, folder_engine: Engine
) -> None:
    steps: list[int] = []
    result = folder_engine.generate(_fast(), on_step=lambda done, total: steps.append(total))
    assert folder_engine.resident() == [QWEN_IMAGE_21_TURBO]
    assert steps == [TURBO_STEPS] * TURBO_STEPS, "the default request runs 8 steps"
    # The tiny preset's Turbo is the same checkpoint: the same image, up to float rounding
    # (sharded files load at other alignments). Another checkpoint would differ entirely.
    from_preset = pixels(engine.generate(_fast()).image)
    assert np.abs(pixels(result.image) - from_preset).max() <= 2
    assert not (folder_engine.config.cache_dir / "tiny-v1").exists()  # nothing was built


def test_the_scheduler_samples_the_grid_of_model_index_json(
    folder_engine: Engine, weights_root: Path
) -> None:
    call = folder_engine.prepare_call(_fast(), [])
    assert "sigmas" not in call.kwargs, "the checkpoint's own grid is never overridden"
    assert call.kwargs["num_inference_steps"] == TURBO_STEPS
    folder_engine.generate(_fast())
    grid = _index(weights_root / QWEN_IMAGE_21_TURBO)["sample_sigmas"]
    sampled = call.pipeline.scheduler.sigmas[:-1]  # the terminal 0 appended by the scheduler
    assert torch.allclose(sampled, torch.tensor(grid, dtype=sampled.dtype))


def test_a_turbo_folder_without_its_grid_is_refused_by_name(
    weights_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "weights"
    build_hub_pipeline_21(root, QWEN_IMAGE_21_BASE)
    (root / QWEN_IMAGE_21_BASE).rename(root / QWEN_IMAGE_21_TURBO)  # 2.1 filed as Turbo
    folder = Engine(EngineConfig(weights=str(root), cache_dir=tmp_path / "unused"))
    with pytest.raises(InferenceError, match=r"Qwen/Qwen-Image-2\.1-Turbo must carry an? 8-step"):
        folder.generate(_fast())


def test_the_hub_cache_serves_turbo_and_2_1_with_one_encoder_and_vae(offline_hub: Path) -> None:
    cache = offline_hub.parent / "engine-cache"
    hub = Engine(EngineConfig(weights="hub", cache_dir=cache, resident_models=2))
    steps: list[int] = []
    fast = hub.generate(_fast(), on_step=lambda done, total: steps.append(done))
    plain = make_request("qwen-image-2.1", prompt="a kite", seed=5, steps=2, width=288, height=256)
    hub.generate(plain)
    assert sorted(hub.resident()) == sorted(REPOS)
    assert steps == list(range(1, TURBO_STEPS + 1))
    assert fast.image.size == (288, 256)
    turbo, base = hub.prepare_call(_fast(), []).pipeline, hub.prepare_call(plain, []).pipeline
    assert turbo.text_encoder is base.text_encoder and turbo.vae is base.vae
    assert turbo.transformer is not base.transformer


def test_both_2_1_checkpoints_count_the_shared_parts_once(offline_hub: Path) -> None:
    cache = offline_hub.parent / "resident-cache"
    config = EngineConfig(weights="hub", cache_dir=cache, resident_models=2)
    source = weight_source("hub", config.cache_dir)
    pipelines = ResidentPipelines(
        config, torch.device("cpu"), torch.float32, lambda: source, MemoryBudget(None, 0, None)
    )
    pairs = ((QWEN_IMAGE_21_BASE, "qwen-image-2.1"), (QWEN_IMAGE_21_TURBO, FAST))
    loaded = [pipelines.load(repo, get_model(slug).recipe, lambda r: None) for repo, slug in pairs]
    base, turbo = (r.footprint for r in loaded)
    shared = {p.name for p in turbo.parts if p.share_id in set(base.share_ids())}
    assert shared == {"text_encoder", "vae"}
    transformer = next(p.bytes for p in turbo.parts if p.name == "transformer")
    assert pipelines.held_bytes() == base.total_bytes + transformer
    assert pipelines.held_bytes() < base.total_bytes + turbo.total_bytes
