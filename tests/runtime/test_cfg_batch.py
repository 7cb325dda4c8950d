"""CFG's two passes in one transformer call: same images, half the calls, never a wrong answer."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwenserve.catalog import get_model
from qwenserve.errors import InferenceError
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
        self.masked: list[bool] = []
        """Per call: whether it passed an attention mask (None lets SDPA use flash kernels)."""
        self._forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.batch_sizes.append(int(kwargs["hidden_states"].shape[0]))
        self.masked.append(kwargs.get("encoder_hidden_states_mask") is not None)
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


@pytest.fixture
def bare_batcher(engines: tuple[Engine, Engine]) -> Iterator[tuple[Any, CfgBatcher]]:
    """A batcher on the unpaired engine's transformer, removed afterwards."""
    _, separate = engines
    transformer = _pipe(separate, "qwen-image").pipe.transformer
    batcher = CfgBatcher(transformer)
    try:
        yield transformer, batcher
    finally:
        del transformer.forward  # back to the class's forward


def _caller(transformer: Any, seed: int = 0) -> tuple[Callable[..., torch.Tensor], Any]:
    """call(embeds, timestep) on fixed latents, and a random text of a given length."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16 * 16, transformer.config.in_channels, generator=generator)

    def text(length: int) -> torch.Tensor:
        return torch.randn(1, length, transformer.config.joint_attention_dim, generator=generator)

    def call(embeds: torch.Tensor, timestep: float = 0.5) -> torch.Tensor:
        with torch.no_grad():
            out = transformer(
                hidden_states=latents,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=None,
                timestep=torch.tensor([timestep]),
                img_shapes=[[(1, 16, 16)]],
                return_dict=False,
            )
        return out[0]

    return call, text


def test_full_texts_of_one_length_pair_without_a_mask(
    bare_batcher: tuple[Any, CfgBatcher],
) -> None:
    transformer, batcher = bare_batcher
    counter = CountingForward(batcher._forward)
    batcher._forward = counter  # type: ignore[assignment]
    call, text = _caller(transformer)
    cond, same_length, shorter = text(6), text(6), text(4)
    expected = call(cond)
    with batcher.armed(same_length, None):
        got = call(cond)
    with batcher.armed(shorter, None):
        call(cond)
    assert counter.batch_sizes == [1, 2, 2]
    assert counter.masked == [False, False, True], "padding needs the mask; full texts do not"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_pass_answered_at_another_timestep_fails_the_call(
    bare_batcher: tuple[Any, CfgBatcher],
) -> None:
    transformer, batcher = bare_batcher
    call, text = _caller(transformer)
    cond, negative = text(6), text(5)
    with pytest.raises(InferenceError, match="another timestep"), batcher.armed(negative, None):
        call(cond, timestep=0.5)
        call(negative, timestep=0.7)  # same latents object, other timestep: never silent


def test_the_engine_arms_no_mask_for_a_full_negative(engines: tuple[Engine, Engine]) -> None:
    paired, _ = engines
    pipe = _pipe(paired, "qwen-image").pipe
    cache = paired.prompt_cache
    _, one = cache.encode(pipe, "Qwen/Qwen-Image", ["blurry"], 1024)
    _, two = cache.encode(pipe, "Qwen/Qwen-Image", ["blurry", "a much longer negative"], 1024)
    assert cache.unless_all_ones(one) is None  # known on the host: no sync, no mask
    assert cache.unless_all_ones(two) is two  # padded rows need the mask
    assert cache.unless_all_ones(torch.ones(1, 3, dtype=torch.long)) is not None  # not its own


def _count_syncs_from_cfg_batch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts value reads the CFG wrapper itself makes (each a device sync on a GPU)."""
    seen: list[str] = []

    def counting(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if sys._getframe(1).f_globals.get("__name__") == "qwenserve.runtime.cfg_batch":
                seen.append(name)
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "equal", counting("equal", torch.equal))
    monkeypatch.setattr(torch.Tensor, "item", counting("item", torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "__bool__", counting("bool", torch.Tensor.__bool__))
    return seen


def test_value_checks_are_per_call_not_per_step(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    paired, _ = engines
    resident = _pipe(paired, "qwen-image")
    counts = []
    for steps in (2, 6):
        request = make_request(
            "qwen-image", prompt="a pier", steps=steps, seed=3, negative_prompt="dark"
        )
        paired.generate(request)  # prompts cached: only the wrapper's own reads remain
        before = resident.cfg.batched_calls
        with monkeypatch.context() as patch:
            seen = _count_syncs_from_cfg_batch(patch)
            paired.generate(request)
        assert resident.cfg.batched_calls == before + steps
        counts.append(len(seen))
    assert counts[0] == counts[1], f"syncs grow with steps: {counts}"


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
