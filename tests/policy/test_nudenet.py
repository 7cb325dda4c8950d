"""The real default classifier (NudeNet's ONNX detector, the optional ``nsfw`` extra that the
dev extra installs) lets the tiny preset's output and a benign image through, within the cost
per image bench/content_policy.py measures (docs/PERFORMANCE.md: ~40-100 ms on 2 CPU cores)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from bench.content_policy import benign_scene

from qwenserve.catalog import validate_request
from qwenserve.config import Settings
from qwenserve.policy.classifier import ImageCheck, image_check
from qwenserve.policy.nudenet import NSFW_LABELS, NudeNetClassifier

# A safety net only: the dev extra installs it, so CI runs these (nudenet is imported lazily).
pytest.importorskip("nudenet", reason="the nsfw extra (pip install -e '.[nsfw]') is not installed")

BUDGET_S = 1.0
"""Per image, median: ~10x what the benchmark measured, room for a loaded CI machine."""


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> ImageCheck:
    """The output check exactly as a worker builds it from settings (the default classifier)."""
    folder = tmp_path_factory.mktemp("policy")
    terms = folder / "terms.txt"
    terms.write_text("", encoding="utf-8")
    settings = Settings(data_dir=folder, content_policy="prompt+output", blocked_terms_file=terms)
    built = image_check(settings, inputs=False)
    assert built is not None
    assert isinstance(built.classifier, NudeNetClassifier)
    return built


def median_s(check: ImageCheck, image: object, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        check.classifier.score(image)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_the_tiny_presets_output_passes(check: ImageCheck, shared_cache: Path) -> None:
    from qwenserve.runtime import Engine, EngineConfig

    engine = Engine(EngineConfig(weights="tiny", cache_dir=shared_cache, resident_models=1))
    request = validate_request(
        "qwen-image-fast", {"prompt": "a portrait in a garden", "steps": 2, "seed": 3}
    )
    image = engine.generate(request).image
    assert not check.blocks(image, what="output")
    assert 0.0 <= check.classifier.score(image) < check.threshold
    assert median_s(check, image) < BUDGET_S


@pytest.mark.parametrize("size", [512, 1024])
def test_a_benign_image_passes(check: ImageCheck, size: int) -> None:
    image = benign_scene(size)
    assert not check.blocks(image, what="output")
    assert median_s(check, image) < BUDGET_S


def test_only_exposed_labels_count() -> None:
    assert all(label.endswith("_EXPOSED") for label in NSFW_LABELS)
    assert "FACE_FEMALE" not in NSFW_LABELS and "MALE_BREAST_EXPOSED" not in NSFW_LABELS


def test_modes_and_alpha_images_are_read(check: ImageCheck) -> None:
    """Palette, greyscale and RGBA images (edit inputs come in any mode) are scored too."""
    scene = benign_scene(256)
    for image in (scene.convert("L"), scene.convert("P"), scene.convert("RGBA")):
        assert 0.0 <= check.classifier.score(image) < check.threshold
