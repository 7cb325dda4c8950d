"""The GPU work a job is charged in the fair order (``store/fair.py``): steps × the output
megapixels admission fixed, so an ``aspect_ratio`` request costs its real size, not 1 MP."""

from __future__ import annotations

import pytest

from qwenserve.catalog import MODELS, validate_request
from qwenserve.store import fair


@pytest.mark.parametrize("ratio", sorted(MODELS["qwen-image"].recipe.native_sizes))
def test_an_aspect_ratio_costs_its_real_size(ratio: str) -> None:
    width, height = MODELS["qwen-image"].recipe.native_sizes[ratio]
    request = validate_request(
        "qwen-image", {"prompt": "a fox", "aspect_ratio": ratio, "steps": 20}
    )
    assert fair.service_units(request) == pytest.approx(20 * width * height / 1e6)
    assert fair.service_units(request) > 20 * 1.5, "more than a 1 MP guess: ~1.5-1.8 MP each"


def test_explicit_sizes_and_steps_scale_the_work() -> None:
    small = validate_request("qwen-image-2512", {"prompt": "a fox", "width": 512, "height": 512})
    big = validate_request("qwen-image-2512", {"prompt": "a fox", "width": 1024, "height": 1024})
    assert fair.service_units(big) == pytest.approx(4 * fair.service_units(small))
    assert fair.service_units(small) == pytest.approx(small.steps * 512 * 512 / 1e6)
