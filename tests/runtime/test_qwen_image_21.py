"""Qwen-Image 2.1 on the tiny preset: text-to-image and edits with 1, 2 and 10 references at the
requested size and format, seeds, the diffusers call the engine makes, batching, LoRAs, RGBA.
The fast slug's Turbo checkpoint has its own file too: test_qwen_image_21_turbo.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qwenserve.catalog import MODELS, GenerationRequest, LoraRef, PipelineKind
from qwenserve.catalog.models_21 import (
    MAX_REFERENCE_IMAGES,
    QWEN_IMAGE_21_BASE,
    QWEN_IMAGE_21_TURBO,
)
from qwenserve.errors import InferenceError, InvalidInput
from qwenserve.media.encode import encode_image
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.call import prefix_cache_bytes, reference_size
from qwenserve.runtime.hub_access import HubSettings
from qwenserve.runtime.memory_plan import (
    GIB,
    prefix_kv_cache_bytes,
    reference_tokens,
    wants_vae_tiling,
)
from qwenserve.runtime.run import to_image
from qwenserve.runtime.sizes import SizePlan
from qwenserve.runtime.tiny_preset import (
    build_tiny_pipeline,
    ensure_tiny_base,
    preset_root,
    tiny_lora_state_dict,
)
from tests.runtime.conftest import make_request, noise_image, pixels, png_base64

SLUGS = ("qwen-image-2.1", "qwen-image-2.1-fast")
FORMATS = ("png", "jpeg", "webp")
WIDE = noise_image(300, 200, seed=1)
TALL = noise_image(120, 240, seed=2)


def _references(count: int) -> list[Image.Image]:
    return [WIDE if i % 2 == 0 else TALL for i in range(count)]


def _request(slug: str, count: int, **body: Any) -> GenerationRequest:
    refs = {f"image_{i + 1}": png_base64(img) for i, img in enumerate(_references(count))}
    # Turbo (the fast slug) takes no steps: it always runs its 8.
    takes_steps = MODELS[slug].param("steps") is not None
    steps = {"steps": 2} if takes_steps and "steps" not in body else {}
    return make_request(slug, prompt="a red fox in the snow", seed=3, **refs, **steps, **body)


def _assert_image(image: Image.Image, width: int, height: int) -> None:
    assert image.mode in ("RGB", "RGBA")
    assert image.size == (width, height)
    assert pixels(image.convert("RGB")).std() > 1.0, "image is (nearly) constant"


@pytest.mark.parametrize("slug", SLUGS)
@pytest.mark.parametrize("count", [0, 1, 2, MAX_REFERENCE_IMAGES])
def test_text_to_image_and_edits_give_the_requested_size_and_format(
    engine: Engine, slug: str, count: int
) -> None:
    image_format = FORMATS[count % len(FORMATS)]
    request = _request(slug, count, width=320, height=256, image_format=image_format)
    result = engine.generate(request, images=_references(count))
    assert (result.width, result.height) == (320, 256)
    _assert_image(result.image, 320, 256)
    encoded = Image.open(io.BytesIO(encode_image(result.image, image_format, request.quality)))
    assert encoded.format == image_format.upper() and encoded.size == (320, 256)


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_each_format_encodes(engine: Engine, image_format: str) -> None:
    request = _request("qwen-image-2.1", 1, image_format=image_format)
    result = engine.generate(request, images=_references(1))
    encoded = encode_image(result.image, request.image_format, request.quality)
    decoded = Image.open(io.BytesIO(encoded))
    assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[image_format]
    assert decoded.size == (result.width, result.height)


def test_match_input_follows_the_last_reference_and_ratios_are_native(engine: Engine) -> None:
    tall = _request("qwen-image-2.1", 2)  # WIDE then TALL: the last one decides
    width, height = engine.output_size(tall, [WIDE.size, TALL.size])
    assert height > width and width % 32 == 0 and height % 32 == 0
    text = make_request("qwen-image-2.1", prompt="x")
    assert engine.output_size(text, []) == (256, 256)  # 1:1 (the tiny preset's area)
    wide = make_request("qwen-image-2.1", prompt="x", aspect_ratio="16:9")
    w, h = engine.output_size(wide, [])
    assert w > h and w % 32 == 0 and h % 32 == 0


def test_odd_explicit_size_is_generated_at_a_multiple_of_32_and_cropped(engine: Engine) -> None:
    request = _request("qwen-image-2.1", 0, width=300, height=270)
    call = engine.prepare_call(request, [])
    assert (call.kwargs["width"], call.kwargs["height"]) == (320, 288)
    result = engine.generate(request)
    assert result.image.size == (300, 270)


def test_same_seed_same_pixels_different_seed_different_pixels(engine: Engine) -> None:
    request = _request("qwen-image-2.1", 2)
    images = _references(2)
    first = pixels(engine.generate(request, images=images).image)
    again = pixels(engine.generate(request, images=images).image)
    other = pixels(engine.generate(dataclasses.replace(request, seed=4), images=images).image)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0


def test_the_call_maps_every_parameter(engine: Engine) -> None:
    request = _request("qwen-image-2.1", 2, guidance=4.5, negative_prompt="blurry", steps=7)
    call = engine.prepare_call(request, _references(2))
    kwargs = call.kwargs
    assert type(call.pipeline).__name__ == "QwenImage21Pipeline"
    assert kwargs["image"] == _references(2)  # the references are the condition images
    assert kwargs["use_kv_cache"] is True  # fixed: the flag changes the pixels
    assert kwargs["true_cfg_scale"] == 4.5 and kwargs["negative_prompt"] == "blurry"
    assert kwargs["num_inference_steps"] == 7
    assert kwargs["output_resolution"] == 256  # the references at the (tiny) output area
    assert "max_sequence_length" not in kwargs and "prompt_embeds" not in kwargs
    plain = engine.prepare_call(_request("qwen-image-2.1", 0), []).kwargs
    assert plain["true_cfg_scale"] == 1.0 and "negative_prompt" not in plain
    assert "image" not in plain


def test_more_references_than_the_model_takes_are_refused(engine: Engine) -> None:
    request = _request("qwen-image-2.1-fast", 1)
    with pytest.raises(InvalidInput) as caught:
        engine.generate(request, images=_references(MAX_REFERENCE_IMAGES + 1))
    assert caught.value.field == f"image_{MAX_REFERENCE_IMAGES + 1}"


def test_text_to_image_batches_one_prompt_and_references_do_not(engine: Engine) -> None:
    first = _request("qwen-image-2.1", 0)
    second = dataclasses.replace(first, seed=99)
    assert engine.batch_key(first) is not None
    assert engine.batch_key(first) == engine.batch_key(second)
    # A shorter prompt would be padded, and a padded sample is not its solo image.
    assert engine.batch_key(dataclasses.replace(first, prompt="a boat")) != engine.batch_key(first)
    assert engine.batch_key(_request("qwen-image-2.1", 1)) is None
    batch = engine.generate_batch([first, second])
    alone = engine.generate(second)
    assert [r.seed for r in batch] == [3, 99]
    difference = np.abs(pixels(batch[1].image) - pixels(alone.image))
    assert difference.max() <= 2  # a batched sample is its solo run up to float rounding


def test_fast_runs_turbos_own_transformer_beside_2_1(engine: Engine) -> None:
    plain = _request("qwen-image-2.1", 0, steps=3)
    fast = _request("qwen-image-2.1-fast", 0)
    before = pixels(engine.generate(plain).image)
    fast_pixels = pixels(engine.generate(fast).image)
    after = pixels(engine.generate(plain).image)
    assert {QWEN_IMAGE_21_BASE, QWEN_IMAGE_21_TURBO} <= set(engine.resident())
    assert np.array_equal(before, after), "the Turbo call changed the base pipeline"
    assert np.abs(fast_pixels - before).mean() > 0.5
    # Byte-identical text encoder and VAE files: one module each for both checkpoints.
    turbo, base = engine.prepare_call(fast, []).pipeline, engine.prepare_call(plain, []).pipeline
    assert turbo.text_encoder is base.text_encoder and turbo.vae is base.vae
    assert turbo.transformer is not base.transformer


@pytest.fixture(scope="module")
def lora_21(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = ensure_tiny_base(shared_cache, QWEN_IMAGE_21_BASE, PipelineKind.QWEN_IMAGE_21)
    path = tmp_path_factory.mktemp("loras21") / "style21.safetensors"
    save_file(tiny_lora_state_dict(base, "a client's 2.1 LoRA"), str(path))
    return path


def test_lora_applies_to_its_job_and_is_removed(engine: Engine, lora_21: Path) -> None:
    request = _request("qwen-image-2.1", 1, steps=2)
    images = _references(1)
    base = pixels(engine.generate(request, images=images).image)
    with_lora = dataclasses.replace(
        request, extra_loras=(LoraRef(field="lora_2_url", location="file:x"),)
    )
    styled = pixels(engine.generate(with_lora, images=images, extra_loras=[lora_21]).image)
    after = pixels(engine.generate(request, images=images).image)
    assert np.abs(styled - base).mean() > 1.0, "the LoRA changed nothing"
    assert np.array_equal(after, base), "the LoRA leaked into the next job"


def test_a_lora_for_another_model_names_its_field(
    engine: Engine, shared_cache: Path, tmp_path: Path
) -> None:
    other = ensure_tiny_base(shared_cache, "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
    path = tmp_path / "other.safetensors"
    save_file(tiny_lora_state_dict(other, "a 20B LoRA"), str(path))
    request = dataclasses.replace(
        _request("qwen-image-2.1", 0),
        extra_loras=(LoraRef(field="lora_3_url", location="file:y"),),
    )
    with pytest.raises(InvalidInput) as caught:
        engine.generate(request, extra_loras=[path])
    assert caught.value.field == "lora_3_url"


def test_transparent_pixels_stay_rgba_and_opaque_ones_become_rgb() -> None:
    plan = SizePlan(4, 4, 4, 4)
    rgba = np.ones((4, 4, 4), dtype=np.float32)
    assert to_image(rgba, plan).mode == "RGB"  # opaque: as every other model
    rgba[0, 0, 3] = 0.0
    image = to_image(rgba, plan)
    assert image.mode == "RGBA" and image.getpixel((0, 0))[3] == 0
    encoded = encode_image(image, "png", 90)
    assert Image.open(io.BytesIO(encoded)).mode == "RGBA"


def test_the_tiny_folder_is_a_real_2_1_layout(shared_cache: Path) -> None:
    folder = ensure_tiny_base(shared_cache, QWEN_IMAGE_21_BASE, PipelineKind.QWEN_IMAGE_21)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline"
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"]
    assert index["text_encoder"] == ["transformers", "Qwen3VLForConditionalGeneration"]
    assert index["transformer"] == ["diffusers", "QwenImage21Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage21"]


def test_the_memory_plan_sizes_the_reference_kv_cache() -> None:
    one_reference = reference_tokens([(1024, 1024)])
    assert one_reference == 4096
    real = prefix_kv_cache_bytes(
        layers=32, inner_dim=4096, prefix_tokens=one_reference, batch=1, dtype_bytes=2, cfg=False
    )
    assert real == 2 * GIB  # 512 KiB per prefix token in bf16
    ten = prefix_kv_cache_bytes(
        layers=32,
        inner_dim=4096,
        prefix_tokens=10 * one_reference,
        batch=1,
        dtype_bytes=2,
        cfg=True,
    )
    assert ten == 40 * GIB  # ten references, a cache per CFG branch
    decode = {"width": 1024, "height": 1024, "batch": 1, "dtype_bytes": 2}
    assert not wants_vae_tiling(None, **decode, work_bytes=5 * GIB)  # a 4 GiB decode
    assert wants_vae_tiling(None, **decode, work_bytes=5 * GIB, held_bytes=real)


def test_each_reference_adds_to_the_calls_kv_cache(engine: Engine) -> None:
    sizes = []
    for count in (0, 1, 2):
        request = _request("qwen-image-2.1", count)
        call = engine.prepare_call(request, _references(count))
        sizes.append(prefix_cache_bytes(call.pipeline, call.kwargs, _references(count), 1))
    assert 0 < sizes[0] < sizes[1] < sizes[2]
    assert reference_size(256, WIDE.size) == (320, 224)  # the pipeline's own resize


def test_the_tiny_21_build_is_deterministic_and_offline() -> None:
    first = build_tiny_pipeline(PipelineKind.QWEN_IMAGE_21, QWEN_IMAGE_21_BASE)
    second = build_tiny_pipeline(PipelineKind.QWEN_IMAGE_21, QWEN_IMAGE_21_BASE)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    # The pipeline derives its system-prefix drop from the chat template: it must be exact.
    template = first.prompt_template_t2i.format("PROMPT")
    ids = first.processor.tokenizer(template)["input_ids"]
    kept = first.processor.tokenizer.decode(ids[first._drop_idx :])
    assert kept.startswith("<|im_start|>user\nPROMPT")


def test_a_tiny_21_generation_takes_seconds_on_a_cpu(engine: Engine) -> None:
    request = _request("qwen-image-2.1", 1, steps=4)
    engine.generate(request, images=_references(1))  # loaded and warm
    started = time.perf_counter()
    engine.generate(request, images=_references(1))
    assert time.perf_counter() - started < 5.0


def test_the_hub_names_the_missing_2_1_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = HubSettings(endpoint="http://127.0.0.1:9", offline=True, cache_dir=tmp_path)
    monkeypatch.setattr(HubSettings, "current", classmethod(lambda cls: settings))
    hub = Engine(EngineConfig(weights="hub", cache_dir=tmp_path / "unused"))
    with pytest.raises(InferenceError, match=r"Qwen/Qwen-Image-2\.1"):
        hub.load("qwen-image-2.1")


def test_the_step_cache_switch_leaves_2_1_without_one(shared_cache: Path) -> None:
    """diffusers 0.42 has no first-block cache for 2.1's blocks (2.1 caches its prefix K/V
    itself): the switch must not make its load fail."""
    cached = Engine(EngineConfig(weights="tiny", cache_dir=shared_cache, step_cache=0.05))
    result = cached.generate(_request("qwen-image-2.1-fast", 0))
    assert result.image.size == (256, 256)


def _cache_snapshot(hub_cache: Path, repo: str, source: Path) -> None:
    """``source``'s files as the Hugging Face cache holds ``repo`` after a download."""
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(source, folder / "snapshots" / revision)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)


def test_weights_hub_runs_the_fast_slug_on_turbo_from_the_cache(
    engine: Engine, shared_cache: Path, tmp_path: Path
) -> None:
    """``qwenserve run --weights hub``, offline: the fast slug's checkpoint by its hub id (no
    LoRA file to fetch), its 8 steps without a ``steps`` parameter."""
    recipe = MODELS["qwen-image-2.1-fast"].recipe
    assert recipe.base_weights == QWEN_IMAGE_21_TURBO and recipe.lightning is None
    engine.load("qwen-image-2.1-fast")  # the tiny Turbo exists
    hub_cache = tmp_path / "hf-home" / "hub"
    _cache_snapshot(hub_cache, recipe.base_weights, preset_root(shared_cache) / recipe.base_weights)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QWENSERVE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    env["QWENSERVE_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join(
        str(Path(p).resolve()) for p in env.get("PYTHONPATH", "src").split(os.pathsep) if p
    )
    out = tmp_path / "fox.png"
    command = [sys.executable, "-m", "qwenserve.cli.main", "run", "qwen-image-2.1-fast"]
    command += ["--weights", "hub", "--prompt", "a fox", "--param", "width=288"]
    command += ["--param", "height=256"]
    done = subprocess.run(
        [*command, "--out", str(out)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(out).size == (288, 256)


def test_2_1_makes_no_previews_and_still_its_image(engine: Engine) -> None:
    request = dataclasses.replace(_request("qwen-image-2.1", 0, steps=3), partial_images=2)
    seen: list[int] = []
    result = engine.generate(request, on_preview=lambda index, k, image: seen.append(k))
    assert seen == [] and result.image.size == (256, 256)


def test_one_step_with_cfg_is_a_valid_image(engine: Engine) -> None:
    """The lowest ``steps`` bound, with CFG on (a negative pass per step): finite pixels (the
    fast slug takes neither: Turbo always runs its 8 steps without CFG)."""
    request = _request("qwen-image-2.1", 1, steps=1, guidance=3)
    result = engine.generate(request, images=_references(1))
    _assert_image(result.image, result.width, result.height)


def test_jpeg_flattens_transparency_over_white() -> None:
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    decoded = Image.open(io.BytesIO(encode_image(image, "jpeg", 95)))
    assert decoded.mode == "RGB"
    assert min(decoded.getpixel((1, 1))) > 240  # white, not the hidden colour
