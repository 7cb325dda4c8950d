"""The engine on the tiny preset: every pipeline, sizes, determinism, schedulers, sharing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from qwenserve.catalog import SchedulerKind
from qwenserve.errors import InferenceError, InvalidInput
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.schedulers import STOCK_SCHEDULER_CONFIG, scheduler_for
from tests.runtime.conftest import (
    assert_valid_image,
    make_request,
    noise_image,
    pixels,
    png_base64,
)

INPUT = noise_image(400, 300, seed=1)
TALL_INPUT = noise_image(120, 240, seed=2)


def test_describe_says_images_are_noise(engine: Engine) -> None:
    assert engine.is_tiny
    assert "random weights: images are noise" in engine.describe()


@pytest.mark.parametrize(
    ("slug", "body"),
    [
        ("qwen-image", {"steps": 4, "aspect_ratio": "16:9"}),
        ("qwen-image-fast", {"steps": 4}),
        ("qwen-image-2512", {"steps": 3, "width": 300, "height": 260}),
    ],
)
def test_text_to_image_gives_the_requested_size(
    engine: Engine, slug: str, body: dict[str, Any]
) -> None:
    request = make_request(slug, prompt="a lighthouse at dusk", seed=7, **body)
    result = engine.generate(request)
    expected = engine.output_size(request, [])
    assert (result.width, result.height) == expected
    if slug == "qwen-image-2512":
        assert expected == (300, 260)  # explicit sizes are honoured exactly
    if slug == "qwen-image":
        assert expected[0] > expected[1]  # 16:9
    assert_valid_image(result.image, *expected)
    assert result.seed == 7
    assert result.inference_time_s > 0


def test_edit_matches_the_input_aspect(engine: Engine) -> None:
    request = make_request(
        "qwen-image-edit-fast", prompt="make it red", image=png_base64(INPUT), steps=2, seed=3
    )
    result = engine.generate(request, images=[INPUT])
    width, height = engine.output_size(request, [INPUT.size])
    assert abs(width / height - 4 / 3) < 0.1
    assert_valid_image(result.image, width, height)


def test_edit_plus_sizes_from_the_last_of_two_images(engine: Engine) -> None:
    request = make_request(
        "qwen-image-edit-plus-product-photography",
        prompt="on a marble table",
        image_1=png_base64(INPUT),
        image_2=png_base64(TALL_INPUT),
        seed=5,
    )
    result = engine.generate(request, images=[INPUT, TALL_INPUT])
    assert result.height > result.width  # the tall second image decides
    assert_valid_image(result.image, result.width, result.height)


def test_edit_plus_explicit_ratio(engine: Engine) -> None:
    request = make_request(
        "qwen-image-edit-plus-product-photography",
        prompt="on a beach",
        image_1=png_base64(INPUT),
        aspect_ratio="21:9",
        seed=5,
    )
    result = engine.generate(request, images=[INPUT])
    assert abs(result.width / result.height - 21 / 9) < 0.15
    assert_valid_image(result.image, result.width, result.height)


def test_same_seed_same_pixels_different_seed_different_pixels(engine: Engine) -> None:
    request = make_request("qwen-image-fast", prompt="a red fox", steps=3, seed=11)
    first = pixels(engine.generate(request).image)
    again = pixels(engine.generate(request).image)
    other = pixels(engine.generate(dataclasses.replace(request, seed=12)).image)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0


def test_stock_scheduler_one_step_would_be_nan_and_the_engine_avoids_it(engine: Engine) -> None:
    stock = FlowMatchEulerDiscreteScheduler.from_config(dict(STOCK_SCHEDULER_CONFIG))
    with pytest.warns(RuntimeWarning):  # 0/0 in the terminal stretch
        stock.set_timesteps(1, mu=0.5)
    assert torch.isnan(stock.sigmas[:-1]).any()  # the trap the engine has to avoid
    fixed = scheduler_for(SchedulerKind.STOCK, 1, STOCK_SCHEDULER_CONFIG)
    fixed.set_timesteps(1, mu=0.5)
    assert torch.isfinite(fixed.sigmas).all()

    request = make_request("qwen-image", prompt="one step", steps=1, seed=1, aspect_ratio="1:1")
    result = engine.generate(request)
    assert_valid_image(result.image, result.width, result.height)


def test_guidance_runs_a_cfg_pass(engine: Engine) -> None:
    base = make_request("qwen-image", prompt="a cat", steps=2, seed=4, aspect_ratio="1:1")
    no_cfg = pixels(engine.generate(dataclasses.replace(base, guidance=1.0)).image)
    cfg = pixels(engine.generate(dataclasses.replace(base, guidance=6.0)).image)
    empty_negative = dataclasses.replace(base, guidance=6.0, negative_prompt="")
    cfg_blank = pixels(engine.generate(empty_negative).image)
    assert np.abs(no_cfg - cfg).mean() > 0.5
    assert np.abs(no_cfg - cfg_blank).mean() > 0.5  # " " still enables CFG


def test_fast_and_plain_share_one_pipeline_and_the_adapter_stays_scoped(engine: Engine) -> None:
    plain = make_request("qwen-image", prompt="a boat", steps=3, seed=9, aspect_ratio="1:1")
    fast = make_request("qwen-image-fast", prompt="a boat", steps=3, seed=9, guidance=1)
    before = pixels(engine.generate(plain).image)
    fast_pixels = pixels(engine.generate(fast).image)
    after = pixels(engine.generate(plain).image)
    assert [key for key in engine.resident() if key == "Qwen/Qwen-Image"] == ["Qwen/Qwen-Image"]
    assert np.array_equal(before, after), "the fast slug's Lightning adapter leaked"
    assert np.abs(fast_pixels - before).mean() > 0.5  # Lightning really was on for fast


def test_progress_and_cancellation(engine: Engine) -> None:
    request = make_request("qwen-image-fast", prompt="a kite", steps=5, seed=2)
    seen: list[tuple[int, int]] = []
    with pytest.raises(InferenceError, match="cancelled"):
        engine.generate(
            request, on_step=lambda d, t: seen.append((d, t)), should_cancel=lambda: len(seen) >= 2
        )
    assert seen == [(1, 5), (2, 5)]  # stopped at the step where cancel was seen

    steps: list[tuple[int, int]] = []
    result = engine.generate(request, on_step=lambda d, t: steps.append((d, t)))
    assert steps == [(i, 5) for i in range(1, 6)]
    assert_valid_image(result.image, result.width, result.height)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_matches_the_contract(shared_cache: Path) -> None:
    gpu = Engine(EngineConfig(cache_dir=shared_cache, device="auto", resident_models=1))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    request = make_request("qwen-image-fast", prompt="a lighthouse", steps=4, seed=3)
    first = gpu.generate(request)
    assert_valid_image(first.image, first.width, first.height)
    assert np.array_equal(pixels(gpu.generate(request).image), pixels(first.image))


def test_resident_answers_while_a_job_holds_the_engine(engine: Engine) -> None:
    """The heartbeat and the worker's look-ahead ask during a job: they must not wait for it."""
    import threading

    engine.load("qwen-image-fast")
    answered: list[list[str]] = []
    in_time: list[bool] = []

    def on_step(done: int, total: int) -> None:
        if done == 1:
            asker = threading.Thread(target=lambda: answered.append(engine.resident()))
            asker.start()
            asker.join(5)  # the job holds the engine lock right now
            in_time.append(not asker.is_alive())

    engine.generate(make_request("qwen-image-fast", prompt="x", steps=2, seed=1), on_step=on_step)
    assert in_time == [True], "resident() waited for the running job"
    assert "Qwen/Qwen-Image" in answered[0]


@pytest.mark.parametrize(
    ("slug", "fields"),
    [
        ("qwen-image-edit-fast", {"image": png_base64(INPUT), "steps": 1}),
        ("qwen-image-edit-plus-product-photography", {"image_1": png_base64(INPUT)}),
    ],
)
def test_edit_prompt_past_the_token_limit_is_a_400_naming_prompt(
    engine: Engine, slug: str, fields: dict[str, Any]
) -> None:
    # 9,000 characters pass validation (10,000 max) but are thousands of tokens: the edit
    # pipelines would fail in the transformer with a shape error (issue 13, defect 6).
    long = make_request(slug, prompt="把这只猫变成红色" * 1125, seed=1, **fields)
    with pytest.raises(InvalidInput) as refused:
        engine.generate(long, images=[INPUT])
    assert refused.value.field == "prompt" and refused.value.http_status == 400
    assert "at most 1024" in refused.value.message
    # Just inside the limit (the tiny tokenizer spends 3 tokens per CJK character) still runs.
    near = make_request(slug, prompt="猫" * 300, seed=1, **fields)
    result = engine.generate(near, images=[INPUT])
    assert_valid_image(result.image, result.width, result.height)
