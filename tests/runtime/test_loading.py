"""Cold start: components loaded concurrently draw what one-after-the-other loading draws, every
load is timed per component, and fp8 quantizes the transformer before it reaches the device."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwenserve.catalog import PipelineKind, get_model
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.memory_plan import MemoryBudget
from qwenserve.runtime.resident import ResidentPipelines
from qwenserve.runtime.weights import weight_source
from tests.runtime.hub_layout import build_hub_pipeline

HEAVY = ("text_encoder", "transformer", "vae")


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen/Qwen-Image in the published layout (sharded files, old text-encoder names)."""
    root = tmp_path_factory.mktemp("hub-weights")
    build_hub_pipeline(root, "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
    return root


def _load(root: Path, tmp_path: Path, *, concurrent: bool) -> Any:
    config = EngineConfig(weights=str(root), cache_dir=tmp_path, resident_models=1)
    pipelines = ResidentPipelines(
        config,
        torch.device("cpu"),
        torch.float32,
        lambda: weight_source(config.weights, config.cache_dir),
        MemoryBudget(None, 0),
        concurrent_load=concurrent,
    )
    recipe = get_model("qwen-image").recipe
    return pipelines, pipelines.load(recipe.base_weights, recipe, lambda _resident: None)


def _draw(pipe: Any) -> np.ndarray[Any, Any]:
    output = pipe(
        prompt="a lantern on a pier",
        negative_prompt=" ",
        true_cfg_scale=2.0,
        num_inference_steps=2,
        width=256,
        height=256,
        generator=torch.Generator().manual_seed(11),
        output_type="np",
    )
    return np.asarray(output.images)


def test_concurrent_loading_draws_what_serial_loading_draws(
    hub_folder: Path, tmp_path: Path
) -> None:
    default_dtype = torch.get_default_dtype()
    register_parameter = torch.nn.Module.register_parameter
    normal = torch.nn.init.normal_

    serial_pipelines, serial = _load(hub_folder, tmp_path, concurrent=False)
    pipelines, concurrent = _load(hub_folder, tmp_path, concurrent=True)
    assert np.array_equal(_draw(concurrent.pipe), _draw(serial.pipe))  # the same image, bit for bit
    for name in HEAVY:  # and the same weights, every tensor
        ours, theirs = (getattr(r.pipe, name).state_dict() for r in (concurrent, serial))
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name

    # The libraries' process-wide switches are as they were (no meta parameters afterwards).
    assert torch.get_default_dtype() == default_dtype
    assert torch.nn.Module.register_parameter is register_parameter
    assert torch.nn.init.normal_ is normal
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"

    # Each load is timed per component, once, and says how it ran.
    for held, resident, was_concurrent in (
        (serial_pipelines, serial, False),
        (pipelines, concurrent, True),
    ):
        timings = resident.timings
        assert held.load_timings == [timings]
        assert timings.concurrent is was_concurrent and timings.key == "Qwen/Qwen-Image"
        assert all(timings.components_s[name] > 0 for name in (*HEAVY, "tokenizer"))
        assert timings.load_s >= max(timings.components_s.values())
        assert timings.fast_paths_s > 0 and timings.ready_after_start_s is not None
        assert "transformer" in timings.describe()


def test_warm_up_time_joins_the_load_timings(shared_cache: Path) -> None:
    engine = Engine(EngineConfig(cache_dir=shared_cache, resident_models=1))
    seconds = engine.warm_up(["qwen-image"])["qwen-image"]
    (timings,) = engine.load_timings()
    assert timings.key == "Qwen/Qwen-Image" and timings.warm_up_s == seconds > 0
    assert timings.total_s > timings.load_s > 0
    assert timings.ready_after_start_s is not None and timings.ready_after_start_s > seconds


@pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="needs torchao (pip install 'qwenserve[gpu]')",
)
def test_fp8_quantizes_the_transformer_before_it_moves_to_the_device(
    shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchao.quantization
    from diffusers import QwenImageTransformer2DModel
    from torchao.quantization import Float8Tensor

    events: list[tuple[str, Any]] = []
    originals: tuple[Any, Any, Any] = (
        QwenImageTransformer2DModel.from_pretrained,
        QwenImageTransformer2DModel.to,
        torchao.quantization.quantize_,
    )
    load, move, quantize_ = originals

    def quantized(module: torch.nn.Module) -> bool:
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        return bool(linears) and all(isinstance(m.weight, Float8Tensor) for m in linears)

    def recording_load(cls: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(("load straight to", kwargs.get("device_map")))
        return load(*args, **kwargs)

    def recording_move(self: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(("move, quantized:", quantized(self)))
        return move(self, *args, **kwargs)

    def recording_quantize(module: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("quantize, layer by layer to", kwargs.get("device")))
        quantize_(module, config, *args, **kwargs)

    monkeypatch.setattr(QwenImageTransformer2DModel, "from_pretrained", classmethod(recording_load))
    monkeypatch.setattr(QwenImageTransformer2DModel, "to", recording_move)
    monkeypatch.setattr(torchao.quantization, "quantize_", recording_quantize)

    engine = Engine(EngineConfig(cache_dir=shared_cache, resident_models=1, quantize="fp8-memory"))
    engine.load("qwen-image")
    # Loaded on the host (no device_map), quantized as each layer goes to the device, and only
    # then the rest of the transformer moved: never its full-precision copy on the device.
    assert events[0] == ("load straight to", None)
    assert events[1] == ("quantize, layer by layer to", torch.device("cpu"))
    assert events[2:] and all(event == ("move, quantized:", True) for event in events[2:])


def test_a_hub_cache_snapshot_loads_through_the_same_loader(
    hub_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--weights hub`` offline: the repo resolved in the HF cache (``models--<org>--<name>``,
    ``refs/main``, ``snapshots/<revision>``), then loaded component by component from there."""
    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Qwen--Qwen-Image"
    shutil.copytree(hub_folder / "Qwen" / "Qwen-Image", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    engine = Engine(EngineConfig(weights="hub", cache_dir=tmp_path / "cache", resident_models=1))
    engine.load("qwen-image")
    (timings,) = engine.load_timings()
    assert timings.key == "Qwen/Qwen-Image" and timings.components_s["transformer"] > 0
