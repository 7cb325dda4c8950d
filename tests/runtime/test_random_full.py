"""random-full builds on the CPU at small configs: every buffer is what the constructor made.

``to_empty`` wipes buffers as well as parameters; 2.1's timestep ``freqs`` (non-persistent, in no
checkpoint) then held garbage (1.7e38 seen) and the GPU proof's qwen21 stage would time NaNs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel, QwenImageTransformer2DModel

from qwenserve.catalog import PipelineKind
from qwenserve.runtime.random_full import _random_transformer
from qwenserve.runtime.random_full_encoders import random_text_encoder

SMALL: dict[str, Any] = {"num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2}
SMALL["axes_dims_rope"] = (4, 6, 6)
CONFIGS: list[tuple[Any, dict[str, Any]]] = [
    (QwenImage21Transformer2DModel, {**SMALL, "context_in_dim": 32}),
    (QwenImageTransformer2DModel, {**SMALL, "joint_attention_dim": 32}),
]


def _poison_fresh_memory() -> None:
    """Fill freed CPU blocks with NaN so an uninitialised tensor reads as garbage, not zeros."""
    junk = [torch.full((1 << 16,), float("nan")) for _ in range(64)]
    del junk


def _assert_buffers_as_built(built: torch.nn.Module, reference: torch.nn.Module) -> None:
    buffers = dict(built.named_buffers())
    expected = dict(reference.named_buffers())
    assert buffers.keys() == expected.keys()
    for name, buffer in buffers.items():
        assert torch.isfinite(buffer.float()).all(), name
        assert torch.equal(buffer, expected[name].to(buffer.dtype)), name


@pytest.mark.parametrize("cls, config", CONFIGS, ids=["2.1", "qwen-image"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_random_full_transformer_buffers_equal_the_constructors(
    cls: Any, config: dict[str, Any], dtype: torch.dtype
) -> None:
    _poison_fresh_memory()
    built = _random_transformer(torch.device("cpu"), dtype, cls, **config)
    _assert_buffers_as_built(built, cls(**config))
    if cls is QwenImage21Transformer2DModel:
        assert any(name.endswith("freqs") for name, _ in built.named_buffers())
    assert all(torch.isfinite(p.float()).all() for p in built.parameters())


def test_random_full_21_timestep_embedding_is_finite_through_a_forward() -> None:
    """The buffer the finding was about, used as the model uses it."""
    cls, config = CONFIGS[0]
    _poison_fresh_memory()
    built = _random_transformer(torch.device("cpu"), torch.bfloat16, cls, **config)
    timesteps = [m for n, m in built.named_modules() if hasattr(m, "freqs") and "time" in n]
    assert timesteps, "no timestep embedding found"
    embedded = timesteps[0](torch.tensor([0.5, 0.999]))
    assert torch.isfinite(embedded).all()


@pytest.mark.parametrize("kind", [PipelineKind.TEXT_TO_IMAGE, PipelineKind.QWEN_IMAGE_21])
def test_random_text_encoders_keep_their_rotary_tables(kind: PipelineKind) -> None:
    _poison_fresh_memory()
    built = random_text_encoder(kind, torch.device("cpu"), torch.float32, full=False)
    buffers = dict(built.named_buffers())
    assert any("inv_freq" in name for name in buffers)
    for name, buffer in buffers.items():
        assert torch.isfinite(buffer.float()).all(), name
    with torch.no_grad():
        hidden = built(input_ids=torch.tensor([[1, 2, 3, 4]]), output_hidden_states=True)
    assert torch.isfinite(hidden.hidden_states[-1]).all()
