"""The EngineConfig switches on the tiny preset: each works and stays within a stated tolerance.

Tolerances are in 8-bit levels (0-255) on the tiny preset, whose random weights (scaled up so
every input matters) amplify small numeric differences far more than a trained model would.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwenserve.config import Settings
from qwenserve.errors import InferenceError
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.config import default_max_batch, quantize_mode, resolve_cfg_batch
from tests.runtime.conftest import assert_valid_image, make_request, pixels

FUSED_TOLERANCE_MEAN_LEVELS = 0.5
"""Fused vs adapter Lightning: the same sum W + BA, added once into W instead of per call."""
BF16_TOLERANCE_MEAN_LEVELS = 8.0
"""bfloat16 keeps 8 mantissa bits: measured mean 4.4 levels on the tiny preset."""
FP8_TOLERANCE_MEAN_LEVELS = 10.0
"""float8 weights (e4m3, per-row scales), Lightning adapter on top: measured mean 6.1 levels."""
STEP_CACHE_TOLERANCE_MEAN_LEVELS = 40.0
"""A skipped step reuses the last step's residual: measured mean 20 levels (6 of 8 skipped)."""
VAE_TILING_TOLERANCE_MEAN_LEVELS = 2.0
"""Tiles are decoded apart and blended over their overlap: measured mean 0.56 levels."""


def _fast(steps: int = 4, seed: int = 3) -> Any:
    return make_request("qwen-image-fast", prompt="a lighthouse", steps=steps, seed=seed)


def _mean_levels(a: Any, b: Any) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def _engine(shared_cache: Path, **switches: Any) -> Engine:
    return Engine(EngineConfig(cache_dir=shared_cache, resident_models=2, **switches))


def test_fused_lightning_has_its_own_pipeline_and_matches_the_adapter(
    engine: Engine, shared_cache: Path
) -> None:
    fused = _engine(shared_cache, fuse_lightning=True)
    result = fused.generate(_fast())
    assert fused.resident() == ["Qwen/Qwen-Image+Qwen-Image-Lightning-8steps-V2.0.safetensors"]
    plain = make_request("qwen-image", prompt="a", steps=2, seed=1, aspect_ratio="1:1")
    fused.generate(plain)  # the plain slug still gets the unfused shared base
    assert "Qwen/Qwen-Image" in fused.resident()
    assert np.array_equal(pixels(fused.generate(plain).image), pixels(engine.generate(plain).image))
    adapter = engine.generate(_fast())
    difference = _mean_levels(result.image, adapter.image)
    print(f"fused vs adapter Lightning: mean {difference:.3f} levels")
    assert difference <= FUSED_TOLERANCE_MEAN_LEVELS
    unfused_base = engine.generate(dataclasses.replace(_fast(), slug="qwen-image", guidance=1.0))
    assert _mean_levels(result.image, unfused_base.image) > 1.0  # Lightning really is in there


def test_prompt_cache_hits_and_changes_nothing(engine: Engine, shared_cache: Path) -> None:
    request = make_request(
        "qwen-image", prompt="a cached prompt", steps=2, seed=8, aspect_ratio="1:1"
    )
    cache = engine.prompt_cache
    first = engine.generate(request)
    hits = cache.hits
    second = engine.generate(request)
    assert cache.hits == hits + 2  # the prompt and the negative prompt
    assert np.array_equal(pixels(first.image), pixels(second.image))
    # Exactly the same pixels as encoding every time (CFG pairing, which needs the cache, off
    # on both sides: it has its own tolerance, tests/runtime/test_cfg_batch.py).
    uncached = _engine(shared_cache, prompt_cache_size=0)
    cached = _engine(shared_cache, cfg_batch=False)
    cached.generate(request)
    assert np.array_equal(
        pixels(uncached.generate(request).image), pixels(cached.generate(request).image)
    )
    assert len(uncached.prompt_cache) == 0 and cached.prompt_cache.hits == 2


def test_bfloat16_on_cpu(engine: Engine, shared_cache: Path) -> None:
    bf16 = _engine(shared_cache, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    result = bf16.generate(_fast())
    assert_valid_image(result.image, result.width, result.height)
    difference = _mean_levels(result.image, engine.generate(_fast()).image)
    print(f"bfloat16 vs float32: mean {difference:.3f} levels")
    assert difference <= BF16_TOLERANCE_MEAN_LEVELS


def test_step_cache_skips_steps_within_tolerance(engine: Engine, shared_cache: Path) -> None:
    # The random tiny model's first-block residual changes by 100-280% per step (a trained
    # model's by a few percent), so only a threshold above 1 skips anything here.
    cached = _engine(shared_cache, step_cache=1.3)
    request = _fast(steps=8)
    cached.load("qwen-image-fast")
    pipe = cached.prepare_call(request).pipeline
    calls = 0

    def count(*_args: Any) -> None:
        nonlocal calls
        calls += 1

    # The cache bypasses a skipped block's body, so count its attention's calls.
    handle = pipe.transformer.transformer_blocks[-1].attn.register_forward_hook(count)
    try:
        result = cached.generate(request)
    finally:
        handle.remove()
    skipped = 8 - calls
    difference = _mean_levels(result.image, engine.generate(request).image)
    print(f"step cache 1.3: {skipped} of 8 steps skipped, mean {difference:.3f} levels")
    assert skipped >= 1
    assert difference <= STEP_CACHE_TOLERANCE_MEAN_LEVELS


def test_step_cache_recovers_after_a_call_that_failed_midway(shared_cache: Path) -> None:
    # The first-block cache keeps the last step's residual; a call that raises mid-way never
    # reaches the pipeline's own reset, and the kept residual has the old call's shape.
    cached = _engine(shared_cache, step_cache=1.3)
    steps = 0

    def fail_at_step_two() -> bool:
        nonlocal steps
        steps += 1
        if steps == 2:
            raise RuntimeError("the worker lost its lease")
        return False

    square = make_request("qwen-image-fast", prompt="a", steps=4, seed=1, aspect_ratio="1:1")
    # The client sees a fixed sentence (the exception's own text stays in the log).
    with pytest.raises(InferenceError, match="generation failed"):
        cached.generate(square, should_cancel=fail_at_step_two)
    wide = make_request("qwen-image-fast", prompt="a", steps=4, seed=1, aspect_ratio="16:9")
    result = cached.generate(wide)
    assert_valid_image(result.image, result.width, result.height)


def test_vae_tiling_forced_on_stays_close(engine: Engine, shared_cache: Path) -> None:
    request = make_request("qwen-image-2512", prompt="a", steps=2, width=384, height=384, seed=4)
    tiled = _engine(shared_cache, vae_tiling=True)
    pipe = tiled.prepare_call(request).pipeline
    assert pipe.vae.use_tiling
    result = tiled.generate(request)
    assert_valid_image(result.image, 384, 384)
    difference = _mean_levels(result.image, engine.generate(request).image)
    print(f"tiled vs whole VAE decode at 384x384: mean {difference:.3f} levels")
    assert difference <= VAE_TILING_TOLERANCE_MEAN_LEVELS
    assert not engine.prepare_call(request).pipeline.vae.use_tiling  # auto: off below 2 MP


def test_cpu_offload_is_refused_without_cuda(shared_cache: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InferenceError, match="cpu_offload needs a CUDA GPU"):
        _engine(shared_cache, cpu_offload=True)


def test_random_full_is_refused_without_cuda(shared_cache: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InferenceError, match="random-full needs a CUDA GPU"):
        _engine(shared_cache, weights="random-full")


HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


@pytest.mark.skipif(HAS_TORCHAO, reason="torchao is installed")
def test_fp8_without_torchao_is_refused(shared_cache: Path) -> None:
    with pytest.raises(InferenceError, match="needs torchao"):
        _engine(shared_cache, quantize="fp8")


def test_quantize_names_and_alias() -> None:
    assert quantize_mode("fp8") == "fp8-memory"  # the old name keeps working
    assert [quantize_mode(m) for m in ("none", "fp8-memory", "fp8-speed")] == [
        "none",
        "fp8-memory",
        "fp8-speed",
    ]
    with pytest.raises(InferenceError, match="unknown quantize 'int4'"):
        quantize_mode("int4")


@pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao (pip install 'qwenserve[gpu]')")
def test_each_fp8_mode_gets_its_torchao_config() -> None:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
    )

    from qwenserve.runtime.fast_paths import fp8_config

    assert isinstance(fp8_config("fp8-memory"), Float8WeightOnlyConfig)
    speed = fp8_config("fp8-speed")
    assert isinstance(speed, Float8DynamicActivationFloat8WeightConfig)
    assert all(isinstance(g, PerRow) for g in speed.granularity)  # row-wise scales


@pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao (pip install 'qwenserve[gpu]')")
@pytest.mark.parametrize("quantize", ["fp8-memory", "fp8"])
def test_fp8_memory_quantizes_and_stays_within_tolerance(
    engine: Engine, shared_cache: Path, quantize: str
) -> None:
    from torchao.quantization import Float8Tensor

    fp8 = _engine(shared_cache, quantize=quantize)
    pipe = fp8.prepare_call(_fast()).pipeline
    linears = [
        module
        for name, module in pipe.transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name  # adapters load later
    ]
    assert linears and all(isinstance(m.weight, Float8Tensor) for m in linears)
    result = fp8.generate(_fast())
    assert_valid_image(result.image, result.width, result.height)
    difference = _mean_levels(result.image, engine.generate(_fast()).image)
    print(f"{quantize} vs float32: mean {difference:.3f} levels")
    assert difference <= FP8_TOLERANCE_MEAN_LEVELS


@pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao (pip install 'qwenserve[gpu]')")
def test_fp8_speed_is_refused_without_float8_matmuls(shared_cache: Path) -> None:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU runs float8 matmuls")
    with pytest.raises(InferenceError, match=r"fp8-speed needs .*compute capability 8\.9"):
        _engine(shared_cache, quantize="fp8-speed")


def test_unmeasured_switches_are_off_on_cuda_by_default() -> None:
    auto = EngineConfig()
    assert auto.cfg_batch is None
    assert resolve_cfg_batch(auto, "cpu") and not resolve_cfg_batch(auto, "cuda")
    assert resolve_cfg_batch(EngineConfig(cfg_batch=True), "cuda")  # forced on stays on
    assert not resolve_cfg_batch(EngineConfig(cfg_batch=False), "cpu")
    assert (default_max_batch("cpu"), default_max_batch("cuda")) == (4, 1)


def test_auto_settings_keep_their_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QWENSERVE_CFG_BATCH", "QWENSERVE_MAX_BATCH", "QWENSERVE_QUANTIZE"):
        monkeypatch.delenv(name, raising=False)
    auto = Settings()
    assert (auto.cfg_batch, auto.max_batch, auto.quantize) == (None, None, "none")
    monkeypatch.setenv("QWENSERVE_CFG_BATCH", "false")
    monkeypatch.setenv("QWENSERVE_MAX_BATCH", "2")
    monkeypatch.setenv("QWENSERVE_QUANTIZE", "fp8-speed")
    forced = Settings()
    assert (forced.cfg_batch, forced.max_batch, forced.quantize) == (False, 2, "fp8-speed")


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(
    os.environ.get("QWENSERVE_SLOW_TESTS") != "1",
    reason="CPU compile: ~7 graphs of 15-30 s each (QWENSERVE_SLOW_TESTS=1 runs it)",
)
def test_compile_warms_every_variant_then_never_compiles_again(
    engine: Engine, shared_cache: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from qwenserve.catalog import LoraRef, PipelineKind
    from qwenserve.runtime.tiny_preset import ensure_tiny_base, tiny_lora_state_dict

    compiled = _engine(shared_cache, compile=True)
    compiled.load("qwen-image-fast", batch_sizes=(1, 2))  # the Lightning adapter set
    compiled.load("qwen-image")  # no adapter
    counts = compiled.compile_counts()
    print(f"after warm-up: {counts}")
    assert counts["compiles"] > 0 and counts["recompiles"] == counts["eager_fallbacks"] == 0

    def fast(prompt: str, ratio: str, seed: int = 1) -> Any:
        body = {"prompt": prompt, "steps": 2, "seed": seed, "aspect_ratio": ratio}
        return make_request("qwen-image-fast", **body)

    # A new prompt length, another aspect ratio, another batch size, the other adapter set.
    result = compiled.generate(fast("a new and much longer prompt about a harbour", "9:16"))
    assert_valid_image(result.image, result.width, result.height)
    compiled.generate_batch([fast(p, "4:3", seed) for seed, p in enumerate(["x", "y y y", "z"])])
    compiled.generate(make_request("qwen-image", prompt="b", steps=2, seed=2, aspect_ratio="3:2"))
    request = fast("warm-up", "1:1")
    compiled_image = compiled.generate(request).image
    assert compiled.compile_counts() == counts, "a warmed variant compiled or ran eagerly"
    difference = _mean_levels(compiled_image, engine.generate(request).image)
    print(f"compiled vs eager: mean {difference:.3f} levels")
    assert difference <= 1.0

    # A variant no warm-up can know (a client's LoRA): eager, counted, and no compile.
    base = ensure_tiny_base(shared_cache, "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
    lora = tmp_path / "style.safetensors"
    save_file(tiny_lora_state_dict(base, "a client's style LoRA"), str(lora))
    with_lora = dataclasses.replace(
        request, extra_loras=(LoraRef(field="lora_2_url", location="file:style"),)
    )
    compiled.generate(with_lora, extra_loras=[lora])
    after = compiled.compile_counts()
    assert after["recompiles"] == 0 and after["eager_fallbacks"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "switches",
    [
        {"cpu_offload": True},
        {"quantize": "fp8-memory"},
        {"quantize": "fp8-speed"},
        {"compile": True},
        {"fuse_lightning": True},
    ],
    ids=["offload", "fp8-memory", "fp8-speed", "compile", "fused"],
)
def test_gpu_switches_run(shared_cache: Path, switches: dict[str, Any]) -> None:
    gpu = Engine(EngineConfig(cache_dir=shared_cache, device="cuda", **switches))
    gpu.warm_up(["qwen-image-fast"])
    result = gpu.generate(_fast())
    assert_valid_image(result.image, result.width, result.height)
