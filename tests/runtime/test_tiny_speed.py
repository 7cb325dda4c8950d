"""Tiny-preset shortcuts: small condition images for edits, small generation for large sizes."""

from __future__ import annotations

import threading
import time

from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module

from qwenserve.runtime import Engine, condition_area
from qwenserve.runtime.sizes import TINY_AREA, TINY_MAX_EXPLICIT_AREA
from tests.runtime.conftest import assert_valid_image, make_request, noise_image, png_base64

PICTURE = noise_image(400, 300, seed=3)


def test_edit_caps_the_condition_area_in_its_thread_only(engine: Engine) -> None:
    request = make_request(
        "qwen-image-edit-fast", prompt="red", image=png_base64(PICTURE), steps=2, seed=1
    )
    seen: dict[str, object] = {}

    def other_thread() -> None:
        seen["other"] = edit_module.calculate_dimensions(1024 * 1024, 1.0)

    def on_step(done: int, total: int) -> None:
        if done == 1:
            seen["wrapped"] = condition_area.is_wrapped()
            seen["here"] = edit_module.calculate_dimensions(1024 * 1024, 1.0)
            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()

    original = edit_module.calculate_dimensions
    result = engine.generate(request, images=[PICTURE], on_step=on_step)
    assert_valid_image(result.image, result.width, result.height)
    assert seen["wrapped"] is True
    assert seen["here"] == (256, 256, None)  # capped at TINY_AREA in the calling thread
    assert TINY_AREA == 256 * 256
    assert seen["other"] == (1024, 1024, None)  # a concurrent real-weights call is unaffected
    assert edit_module.calculate_dimensions is original and not condition_area.is_wrapped()


def test_large_explicit_size_is_generated_small_and_resized(engine: Engine) -> None:
    request = make_request("qwen-image-2512", prompt="a", steps=2, width=2048, height=1024)
    plan = engine.prepare_call(request).size
    assert plan.generate_width * plan.generate_height <= TINY_MAX_EXPLICIT_AREA * 1.1
    assert abs(plan.generate_width / plan.generate_height - 2.0) < 0.1
    started = time.perf_counter()
    result = engine.generate(request)
    elapsed_s = time.perf_counter() - started
    assert_valid_image(result.image, 2048, 1024)
    assert elapsed_s < 20  # full size on a CPU takes minutes
