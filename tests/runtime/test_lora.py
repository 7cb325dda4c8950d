"""Extra LoRAs: applied for one job only, removed exactly, refused when not for this model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qwenserve.catalog import GenerationRequest, LoraRef, PipelineKind
from qwenserve.errors import InferenceError, InvalidInput
from qwenserve.runtime import Engine
from qwenserve.runtime.tiny_preset import ensure_tiny_base, tiny_lora_state_dict
from tests.runtime.conftest import make_request, noise_image, pixels, png_base64


def _with_lora(request: GenerationRequest) -> GenerationRequest:
    return dataclasses.replace(
        request, extra_loras=(LoraRef(field="lora_2_url", location="file:extra"),)
    )


@pytest.fixture(scope="module")
def style_lora(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA for the tiny Qwen-Image transformer, as a client would upload one."""
    base = ensure_tiny_base(shared_cache, "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
    path = tmp_path_factory.mktemp("loras") / "style.safetensors"
    save_file(tiny_lora_state_dict(base, "a client's style LoRA"), str(path))
    return path


def _adapters(
    engine: Engine, request: GenerationRequest, images: Sequence[Image.Image] = ()
) -> set[str]:
    pipe = engine.prepare_call(request, images).pipeline
    return {name for names in pipe.get_list_adapters().values() for name in names}


def test_lora_applies_to_its_job_and_leaves_no_trace(engine: Engine, style_lora: Path) -> None:
    request = make_request("qwen-image-fast", prompt="a teapot", steps=3, seed=21)
    adapters_before = _adapters(engine, request)
    base = pixels(engine.generate(request).image)
    styled = pixels(engine.generate(_with_lora(request), extra_loras=[style_lora]).image)
    after = pixels(engine.generate(request).image)
    assert np.abs(styled - base).mean() > 1.0, "the LoRA changed nothing"
    assert np.array_equal(after, base), "the LoRA leaked into the next job"
    assert _adapters(engine, request) == adapters_before


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a safetensors file",
        {
            "unrelated.lora_A.weight": torch.zeros(4, 4),
            "unrelated.lora_B.weight": torch.zeros(4, 4),
        },
        {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 7)},
        {"model.weight": torch.zeros(2, 2)},
    ],
    ids=["garbage", "other-model-keys", "wrong-shapes", "not-lora"],
)
def test_invalid_lora_names_its_field(
    engine: Engine, tmp_path: Path, content: bytes | dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, str(path))
    image = noise_image(64, 48)
    request = make_request(
        "qwen-image-edit-plus-product-photography",
        prompt="on a shelf",
        image_1=png_base64(image),
        lora_3_url="https://example.com/bad.safetensors",
    )
    adapters_before = _adapters(engine, request, [image])
    with pytest.raises(InvalidInput) as caught:
        engine.generate(request, images=[image], extra_loras=[path])
    assert caught.value.field == "lora_3_url"
    assert _adapters(engine, request, [image]) == adapters_before


def test_nan_output_is_an_inference_error(
    engine: Engine, shared_cache: Path, tmp_path: Path
) -> None:
    base = ensure_tiny_base(shared_cache, "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
    state = tiny_lora_state_dict(base, "poison")
    state = {key: torch.full_like(value, float("nan")) for key, value in state.items()}
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    request = make_request("qwen-image-fast", prompt="a teapot", steps=1, seed=1)
    with pytest.raises(InferenceError, match="NaN"):
        engine.generate(_with_lora(request), extra_loras=[path])
    assert np.isfinite(pixels(engine.generate(request).image)).all()


def test_lora_without_the_transformer_prefix_loads(
    engine: Engine, style_lora: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    state = load_file(str(style_lora))
    bare = {key.removeprefix("transformer."): value for key, value in state.items()}
    bare_path = tmp_path / "bare.safetensors"
    save_file(bare, str(bare_path))
    request = make_request("qwen-image-fast", prompt="a teapot", steps=3, seed=21)
    prefixed = pixels(engine.generate(_with_lora(request), extra_loras=[style_lora]).image)
    unprefixed = pixels(engine.generate(_with_lora(request), extra_loras=[bare_path]).image)
    base = pixels(engine.generate(request).image)
    assert np.array_equal(prefixed, unprefixed)
    assert np.abs(unprefixed - base).mean() > 1.0


def test_partly_matching_lora_is_refused(engine: Engine, style_lora: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(style_lora))
    state["transformer.transformer_blocks.99.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)
    state["transformer.transformer_blocks.99.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    request = make_request("qwen-image-fast", prompt="a teapot", steps=2, seed=21)
    with pytest.raises(InvalidInput, match=r"transformer_blocks\.99") as caught:
        engine.generate(_with_lora(request), extra_loras=[path])
    assert caught.value.field == "lora_2_url"

    wrong_rank = load_file(str(style_lora))
    key = next(k for k in wrong_rank if k.endswith("lora_B.weight"))
    wrong_rank[key] = torch.zeros(wrong_rank[key].shape[0], 3)
    path = tmp_path / "rank.safetensors"
    save_file(wrong_rank, str(path))
    with pytest.raises(InvalidInput, match="one rank"):
        engine.generate(_with_lora(request), extra_loras=[path])
