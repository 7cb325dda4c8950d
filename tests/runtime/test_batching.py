"""Batching: one pipeline call for several requests, each image (nearly) its solo image."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from qwenserve.catalog import LoraRef
from qwenserve.errors import InferenceError
from qwenserve.runtime import Engine
from tests.runtime.conftest import make_request, noise_image, pixels, png_base64

BATCH_TOLERANCE_LEVELS = 2
"""Max |batch - solo| per 8-bit channel value. A batch pads the prompts to one length (with a
mask) and runs batched matmuls, so float rounding differs (~1e-6); after rounding to 8 bits a
few values move by one level. Measured on the tiny preset: see test output (max 1)."""


def _requests() -> list[Any]:
    base = make_request("qwen-image", prompt="a lighthouse", steps=3, seed=1, aspect_ratio="1:1")
    return [
        base,
        dataclasses.replace(base, prompt="a red fox in the snow, watercolor", seed=2),
        dataclasses.replace(base, prompt="x", seed=3, negative_prompt="blurry"),
    ]


def test_batch_equals_solo_within_tolerance_and_is_deterministic(engine: Engine) -> None:
    requests = _requests()
    keys = {engine.batch_key(r) for r in requests}
    assert len(keys) == 1 and None not in keys
    batch = engine.generate_batch(requests)
    again = engine.generate_batch(requests)
    solo = [engine.generate(r) for r in requests]
    assert [b.seed for b in batch] == [1, 2, 3]
    differences = []
    for batched, alone, repeat in zip(batch, solo, again, strict=True):
        assert batched.image.size == alone.image.size == (batched.width, batched.height)
        assert np.array_equal(pixels(batched.image), pixels(repeat.image)), "not reproducible"
        differences.append(int(np.abs(pixels(batched.image) - pixels(alone.image)).max()))
    print(f"max |batch - solo| per request, 8-bit levels: {differences}")
    assert max(differences) <= BATCH_TOLERANCE_LEVELS
    # Each request really got its own prompt and seed.
    assert np.abs(pixels(batch[0].image) - pixels(batch[1].image)).mean() > 1.0
    assert batch[0].inference_time_s == batch[1].inference_time_s > 0


def test_fast_batch_without_cfg(engine: Engine) -> None:
    base = make_request("qwen-image-fast", prompt="a kite", steps=2, seed=5)
    other = dataclasses.replace(base, prompt="a kite over the sea", seed=6)
    batch = engine.generate_batch([base, other])
    solo = engine.generate(other)
    assert np.abs(pixels(batch[1].image) - pixels(solo.image)).max() <= BATCH_TOLERANCE_LEVELS


def test_batch_key_equal_and_unequal(engine: Engine) -> None:
    base = make_request("qwen-image", prompt="a", steps=3, seed=1, aspect_ratio="1:1")
    same = [
        dataclasses.replace(base, prompt="b", seed=9),
        dataclasses.replace(base, negative_prompt="ugly"),
        dataclasses.replace(base, image_format="jpeg", quality=50, base64=True),
    ]
    for request in same:
        assert engine.batch_key(request) == engine.batch_key(base)
    different = [
        dataclasses.replace(base, steps=4),
        make_request("qwen-image", prompt="a", steps=3, seed=1, aspect_ratio="16:9"),
        dataclasses.replace(base, guidance=1.0),
        dataclasses.replace(base, guidance=5.0),
        dataclasses.replace(base, slug="qwen-image-fast"),
    ]
    for request in different:
        assert engine.batch_key(request) != engine.batch_key(base)
    sized = make_request("qwen-image-2512", prompt="a", width=512, height=512)
    wider = make_request("qwen-image-2512", prompt="a", width=576, height=512)
    assert engine.batch_key(sized) != engine.batch_key(wider)


def test_never_batched(engine: Engine) -> None:
    image = png_base64(noise_image(64, 48))
    plus = make_request("qwen-image-edit-plus-product-photography", prompt="a", image_1=image)
    edit = make_request("qwen-image-edit-fast", prompt="a", image=image, steps=2)
    lora = dataclasses.replace(
        make_request("qwen-image-fast", prompt="a", steps=2),
        extra_loras=(LoraRef(field="lora_2_url", location="file:x"),),
    )
    assert engine.batch_key(plus) is None
    assert engine.batch_key(edit) is None
    assert engine.batch_key(lora) is None
    with pytest.raises(InferenceError, match="cannot share"):
        engine.generate_batch([plus, plus], images=[[noise_image(64, 48)]] * 2)
    fast = make_request("qwen-image-fast", prompt="a", steps=2)
    with pytest.raises(InferenceError, match="cannot share"):
        engine.generate_batch([fast, dataclasses.replace(fast, steps=3)])


def test_batch_cancellation(engine: Engine) -> None:
    base = make_request("qwen-image-fast", prompt="a", steps=4, seed=1)
    with pytest.raises(InferenceError, match="cancelled"):
        engine.generate_batch([base, dataclasses.replace(base, seed=2)], should_cancel=lambda: True)
