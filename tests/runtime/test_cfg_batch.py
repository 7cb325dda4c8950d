"""CFG's two passes in one transformer call: same images, half the calls, never a wrong answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwenserve.catalog import get_model
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.cfg_batch import CfgBatcher
from tests.runtime.conftest import make_request, pixels

CFG_TOLERANCE_LEVELS = 2
"""Max |paired - separate| per 8-bit channel value: the paired call pads the two texts to one
length with a mask and runs batched kernels, as request batching does (same bound, same cause)."""


class CountingForward:
    """Counts the transformer's real forward calls (put between the batcher and the forward)."""

    def __init__(self, forward: Any) -> None:
        self.calls = 0
        self.batch_sizes: list[int] = []
        self._forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.batch_sizes.append(int(kwargs["hidden_states"].shape[0]))
        return self._forward(*args, **kwargs)


@pytest.fixture(scope="module")
def engines(shared_cache: Path) -> tuple[Engine, Engine]:
    paired = Engine(EngineConfig(weights="tiny", cache_dir=shared_cache, cfg_batch=True))
    separate = Engine(EngineConfig(weights="tiny", cache_dir=shared_cache, cfg_batch=False))
    return paired, separate


def _pipe(engine: Engine, slug: str) -> Any:
    engine.load(slug)
    return engine._resident_for(get_model(slug).recipe)


def test_cfg_passes_share_one_call_and_match_two_calls(engines: tuple[Engine, Engine]) -> None:
    paired, separate = engines
    request = make_request(
        "qwen-image", prompt="a lighthouse at dusk", steps=4, seed=3, negative_prompt="blurry"
    )
    resident = _pipe(paired, "qwen-image")
    assert resident.cfg is not None and _pipe(separate, "qwen-image").cfg is None
    counter = counting_forward_under(resident)
    with_pairs = paired.generate(request)
    assert counter.calls == 4 and counter.batch_sizes == [2] * 4, "one call per step"
    without = separate.generate(request)
    difference = np.abs(pixels(with_pairs.image) - pixels(without.image)).max()
    assert difference <= CFG_TOLERANCE_LEVELS
    assert paired.generate(request).image.tobytes() == with_pairs.image.tobytes()


def counting_forward_under(resident: Any) -> CountingForward:
    batcher: CfgBatcher = resident.cfg
    counter = CountingForward(batcher._forward)
    batcher._forward = counter  # type: ignore[assignment]
    return counter


def test_a_batch_of_requests_with_cfg_pairs_too(engines: tuple[Engine, Engine]) -> None:
    paired, separate = engines
    requests = [
        make_request("qwen-image", prompt="a red fox", steps=2, seed=s, aspect_ratio="1:1")
        for s in (1, 2)
    ]
    together = paired.generate_batch(requests)
    apart = separate.generate_batch(requests)
    for one, other in zip(together, apart, strict=True):
        assert np.abs(pixels(one.image) - pixels(other.image)).max() <= CFG_TOLERANCE_LEVELS


def test_no_cfg_no_pairing(engines: tuple[Engine, Engine]) -> None:
    paired, _ = engines
    resident = _pipe(paired, "qwen-image-fast")
    assert resident.cfg is not None  # same base pipeline as qwen-image
    before = resident.cfg.batched_calls
    paired.generate(make_request("qwen-image-fast", prompt="x", steps=2, seed=1))
    assert resident.cfg.batched_calls == before, "guidance 1: one pass per step, nothing paired"


def test_a_second_call_that_differs_is_computed_not_answered_from_the_pair(
    engines: tuple[Engine, Engine],
) -> None:
    _, separate = engines
    transformer = _pipe(separate, "qwen-image").pipe.transformer
    batcher = CfgBatcher(transformer)
    try:
        generator = torch.Generator().manual_seed(0)
        dim = transformer.config.joint_attention_dim
        latents = torch.randn(1, 16 * 16, transformer.config.in_channels, generator=generator)
        timestep = torch.tensor([0.5])
        cond = torch.randn(1, 7, dim, generator=generator)
        armed_negative = torch.randn(1, 5, dim, generator=generator)
        other_negative = torch.randn(1, 5, dim, generator=generator)
        shapes = [[(1, 16, 16)]]

        def call(embeds: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = transformer(
                    hidden_states=latents,
                    encoder_hidden_states=embeds,
                    encoder_hidden_states_mask=None,
                    timestep=timestep,
                    img_shapes=shapes,
                    return_dict=False,
                )
            return out[0]

        expected_cond, expected_other, expected_armed = (
            call(cond),
            call(other_negative),
            call(armed_negative),
        )
        with batcher.armed(armed_negative, None):
            got_cond = call(cond)
            # Not what the pair kept: computed afresh (itself paired with the armed negative).
            got_other = call(other_negative)
        assert batcher.batched_calls == 2
        torch.testing.assert_close(got_cond, expected_cond, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_other, expected_other, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got_other, expected_armed, rtol=1e-2, atol=1e-3)
        with batcher.armed(armed_negative, None):
            call(cond)
            got_armed = call(armed_negative)  # answered from the pair
        assert batcher.batched_calls == 3
        torch.testing.assert_close(got_armed, expected_armed, rtol=1e-4, atol=1e-5)
    finally:
        del transformer.forward  # back to the class's forward
