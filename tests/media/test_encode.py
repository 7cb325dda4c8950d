"""encode_image: each format round-trips, quality matters for lossy formats."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from qwenserve.catalog.request import CONTENT_TYPES
from qwenserve.media.encode import encode_image


def _noise(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.effect_noise(size, 60).convert(mode)


@pytest.mark.parametrize(
    ("image_format", "pillow_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_round_trip_keeps_format_and_size(image_format: str, pillow_format: str) -> None:
    data = encode_image(_noise(), image_format, 80)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == pillow_format
    assert decoded.size == (64, 48)
    assert Image.MIME[pillow_format] == CONTENT_TYPES[image_format]


def test_png_is_lossless() -> None:
    image = _noise()
    decoded = Image.open(io.BytesIO(encode_image(image, "png", 1)))
    assert decoded.convert("RGB").tobytes() == image.tobytes()


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_quality_changes_lossy_output(image_format: str) -> None:
    image = _noise()
    low = encode_image(image, image_format, 20)
    high = encode_image(image, image_format, 95)
    assert low != high
    assert len(low) < len(high)


def test_png_ignores_quality() -> None:
    image = _noise()
    assert encode_image(image, "png", 10) == encode_image(image, "png", 100)


def test_jpeg_from_rgba_and_grey() -> None:
    for mode in ("RGBA", "L", "P"):
        decoded = Image.open(io.BytesIO(encode_image(_noise(mode), "jpeg", 90)))
        assert decoded.mode == "RGB"


def test_webp_keeps_alpha() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    decoded = Image.open(io.BytesIO(encode_image(image, "webp", 90)))
    assert decoded.mode == "RGBA"


def test_unknown_format_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="gif"):
        encode_image(_noise(), "gif", 90)


@pytest.mark.parametrize(
    ("mode", "size"),
    [("RGB", (1, 1)), ("RGB", (513, 7)), ("RGBA", (33, 65)), ("L", (100, 3)), ("LA", (9, 9))],
)
def test_png_is_lossless_for_every_mode_and_odd_sizes(mode: str, size: tuple[int, int]) -> None:
    image = _noise("RGBA" if mode == "LA" else mode, size)
    if mode == "LA":
        image = image.convert("LA")
    data = encode_image(image, "png", 90)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    decoded = Image.open(io.BytesIO(data))
    expected = image.convert("RGBA") if mode == "LA" else image
    assert decoded.mode == expected.mode
    assert decoded.tobytes() == expected.tobytes()


def test_png_of_a_palette_image_keeps_its_colours() -> None:
    image = _noise("RGB").convert("P")
    decoded = Image.open(io.BytesIO(encode_image(image, "png", 90)))
    assert decoded.convert("RGB").tobytes() == image.convert("RGB").tobytes()


def test_png_with_the_standard_zlib_fallback_decodes_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import zlib

    from qwenserve.media import encode

    image = _noise(size=(70, 40))
    fast = encode.encode_png(image)
    monkeypatch.setattr(encode, "_compress", zlib.compress)
    fallback = encode.encode_png(image)
    assert fast != fallback  # two different deflate implementations ...
    for data in (fast, fallback):  # ... one image
        assert Image.open(io.BytesIO(data)).tobytes() == image.tobytes()
