"""Denoising previews from the latents (OpenAI's partial_images), on the tiny preset's real
pipelines: evenly spaced, the output's size, one per batch row, and free of the final image."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from qwenserve.runtime import Engine
from qwenserve.runtime.preview import latents_to_rgb, preview_steps, unpack_latents
from tests.runtime.conftest import make_request, noise_image, png_base64


def test_preview_steps_are_evenly_spaced_and_never_the_last() -> None:
    assert preview_steps(8, 3) == (2, 4, 6)
    assert preview_steps(30, 3) == (7, 15, 22)
    assert preview_steps(4, 2) == (1, 2)
    assert preview_steps(3, 3) == (1, 2)  # too few steps: fewer previews
    assert preview_steps(1, 2) == ()
    assert preview_steps(8, 0) == ()


def test_unpack_inverts_qwen_image_packing() -> None:
    latents = torch.randn(2, 16, 6, 4)
    # Qwen-Image's _pack_latents: 2x2 patches, channels first within a patch.
    packed = latents.view(2, 16, 3, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 3 * 2, 64)
    assert torch.equal(unpack_latents(packed, 3, 2), latents)


def test_projection_is_linear_in_16_channels() -> None:
    rgb = latents_to_rgb(torch.zeros(1, 16, 2, 2))
    assert rgb.shape == (1, 2, 2, 3)
    # zero latents give the bias colour: (bias + 1) * 127.5
    assert tuple(rgb[0, 0, 0]) == (104, 116, 85)


def _collect(engine: Engine, request_slug: str, **body: object) -> tuple[list, Image.Image]:
    got: list[tuple[int, int, Image.Image]] = []
    request = dataclasses.replace(
        make_request(request_slug, **body), partial_images=2, preview_id="p" * 12
    )
    out = engine.generate(
        request,
        images=[noise_image(96, 64)] if request.images else (),
        on_preview=lambda row, index, image: got.append((row, index, image)),
    )
    return got, out.image


def test_generate_makes_the_previews_asked_for(engine: Engine) -> None:
    got, final = _collect(engine, "qwen-image-fast", prompt="a red kite", steps=4, seed=3)
    assert [(row, index) for row, index, _ in got] == [(0, 0), (0, 1)]
    for _, _, image in got:
        assert image.mode == "RGB" and image.size == final.size
    assert got[0][2].tobytes() != got[1][2].tobytes()  # the latents moved between them


def test_edit_previews_follow_the_output_size(engine: Engine) -> None:
    got, final = _collect(
        engine,
        "qwen-image-edit-fast",
        prompt="make it blue",
        steps=3,
        image=png_base64(noise_image(96, 64)),
    )
    assert len(got) == 2 and all(image.size == final.size for _, _, image in got)


def test_batch_rows_get_their_own_previews(engine: Engine) -> None:
    requests = [
        dataclasses.replace(
            make_request("qwen-image-fast", prompt="a kite", steps=3, seed=seed),
            partial_images=partial,
            preview_id="q" * 12,
        )
        for seed, partial in ((1, 1), (2, 0), (3, 1))
    ]
    got: list[tuple[int, int]] = []
    engine.generate_batch(requests, on_preview=lambda row, index, _image: got.append((row, index)))
    assert sorted(got) == [(0, 0), (2, 0)]


@pytest.mark.parametrize("partial", [0])
def test_no_previews_unless_asked(engine: Engine, partial: int) -> None:
    got: list[object] = []
    request = make_request("qwen-image-fast", prompt="a kite", steps=3)
    engine.generate(request, on_preview=lambda *args: got.append(args))
    assert got == [] and request.partial_images == partial
