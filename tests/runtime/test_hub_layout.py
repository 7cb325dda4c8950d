"""``--weights PATH`` with a folder laid out exactly like the published hub repos.

The folder (tests/runtime/hub_layout.py) holds the tiny preset's models in the published files:
sharded weights with index files, the text encoder as transformers 4.5x wrote it, a tokenizer
without ``tokenizer.json``, the published scheduler and processor configs, and the Lightning
LoRAs at their published paths in lightx2v's key format. It must load through the real engine
and draw what the preset draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwenserve.catalog import PipelineKind, get_model
from qwenserve.errors import InferenceError
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.tiny_preset import ensure_tiny_lora
from tests.runtime.conftest import assert_valid_image, make_request, noise_image, pixels, png_base64
from tests.runtime.hub_layout import build_hub_pipeline, published_shards, write_lightx2v_lora

SLUGS = ("qwen-image-fast", "qwen-image-edit-plus-product-photography")


@pytest.fixture(scope="module")
def hub_root(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen/Qwen-Image and Qwen/Qwen-Image-Edit-2509 with their LoRAs, as an operator lays
    them out: ``<root>/<org>/<name>`` per repo, ``<root>/<repo>/<filename>`` per LoRA."""
    root = tmp_path_factory.mktemp("hub-weights")
    for slug in SLUGS:
        recipe = get_model(slug).recipe
        build_hub_pipeline(root, recipe.base_weights, recipe.pipeline)
        sources = [recipe.lightning, *recipe.preset_loras.values()]
        for source in (s for s in sources if s is not None):
            preset = ensure_tiny_lora(shared_cache, source, recipe.base_weights, recipe.pipeline)
            write_lightx2v_lora(preset, root / source.repo / source.filename)
    return root


@pytest.fixture
def tiny_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generate at the tiny preset's sizes: the models inside are tiny, and the real sizes
    (1-2 MP) take half a minute on a CPU. Only sizes change; weights load as configured."""
    monkeypatch.setattr(Engine, "is_tiny", property(lambda self: True))


def test_the_folder_has_the_published_layout(hub_root: Path) -> None:
    base = hub_root / "Qwen" / "Qwen-Image"
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    for folder, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")):
        shards = published_shards(base / folder, stem)
        weight_map = json.loads((base / folder / f"{stem}.safetensors.index.json").read_text())
        assert len(shards) > 1 and sorted(set(weight_map["weight_map"].values())) == shards
    assert not (base / "tokenizer" / "tokenizer.json").exists()
    assert (base / "tokenizer" / "vocab.json").is_file()
    edit = hub_root / "Qwen" / "Qwen-Image-Edit-2509"
    preprocessor = json.loads((edit / "processor" / "preprocessor_config.json").read_text())
    assert preprocessor["max_pixels"] == 12845056
    lightning = get_model("qwen-image-fast").recipe.lightning
    assert lightning is not None
    assert (hub_root / "lightx2v" / "Qwen-Image-Lightning" / lightning.filename).is_file()


def test_text_to_image_from_the_published_layout_matches_the_preset(
    engine: Engine, hub_root: Path, tmp_path: Path, tiny_sizes: None
) -> None:
    request = make_request("qwen-image-fast", prompt="a lantern at dusk", steps=2, seed=8)
    from_preset = pixels(engine.generate(request).image)
    folder = Engine(EngineConfig(weights=str(hub_root), cache_dir=tmp_path / "unused"))
    from_folder = pixels(folder.generate(request).image)
    # Same weights, tokenizer and Lightning LoRA; only float rounding may differ (weights read
    # from shards land at other memory alignments than the preset's single file, and the CPU
    # kernels round accordingly). A text encoder, tokenizer or LoRA that did not load would
    # change the image entirely.
    assert np.abs(from_folder - from_preset).max() <= 2
    assert np.abs(from_folder - from_preset).mean() < 0.05
    assert not (tmp_path / "unused" / "tiny-v1").exists()  # no preset was built


def test_edit_plus_from_the_published_layout(
    hub_root: Path, tmp_path: Path, tiny_sizes: None
) -> None:
    folder = Engine(EngineConfig(weights=str(hub_root), cache_dir=tmp_path / "unused"))
    image = noise_image(96, 64, seed=3)
    request = make_request(
        "qwen-image-edit-plus-product-photography", prompt="on a shelf", image_1=png_base64(image)
    )
    result = folder.generate(request, images=[image])
    width, height = folder.output_size(request, [image.size])
    assert_valid_image(result.image, width, height)


def test_a_missing_lightning_file_is_named(hub_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "weights"
    build_hub_pipeline(root, "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
    folder = Engine(EngineConfig(weights=str(root), cache_dir=tmp_path / "unused"))
    folder.load("qwen-image")  # the base alone serves the base slug
    with pytest.raises(InferenceError, match=r"Qwen-Image-Lightning-8steps-V2\.0\.safetensors"):
        folder.load("qwen-image-fast")
