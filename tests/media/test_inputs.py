"""load_input_image: every source form, the format and size guards, and pixel normalisation."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import pytest
from PIL import Image

from qwenserve.errors import InvalidInput, InvalidRequest
from qwenserve.media.fetch import UrlFetcher
from qwenserve.media.inputs import load_input_image
from tests.media.loopback import LoopbackServer, body_route, make_image_bytes

FETCHER = UrlFetcher(allow_private=True, timeout_s=5)
RED = (200, 30, 40)


def _load(source: str, **limits: int) -> Image.Image:
    return load_input_image(source, field="image_1", fetcher=FETCHER, **limits)


def _noise_png() -> bytes:
    # Noise makes the base64 text use '+' and '/' (so the URL-safe test means something).
    buffer = io.BytesIO()
    Image.effect_noise((48, 40), 80).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


# --- source forms -------------------------------------------------------------------------


def test_data_uri() -> None:
    encoded = base64.b64encode(make_image_bytes("PNG")).decode()
    image = _load(f"data:image/png;base64,{encoded}")
    assert image.mode == "RGB"
    assert image.size == (32, 24)
    assert image.getpixel((0, 0)) == RED


def test_data_uri_claim_is_ignored_for_the_real_format() -> None:
    encoded = base64.b64encode(make_image_bytes("JPEG")).decode()
    assert _load(f"data:image/png;base64,{encoded}").size == (32, 24)
    gif = base64.b64encode(make_image_bytes("GIF")).decode()
    with pytest.raises(InvalidInput, match="GIF"):
        _load(f"data:image/png;base64,{gif}")


def test_raw_base64_with_whitespace_urlsafe_and_no_padding() -> None:
    data = _noise_png()
    standard = base64.b64encode(data).decode()
    assert "+" in standard or "/" in standard
    reference = _load(standard)
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(urlsafe[i : i + 76] for i in range(0, len(urlsafe), 76))
    for form in (urlsafe, wrapped, f"  {standard}\r\n", standard.rstrip("=")):
        image = _load(form)
        assert image.tobytes() == reference.tobytes()


def test_url_source_fetched(server: LoopbackServer) -> None:
    server.routes["/a.webp"] = body_route(make_image_bytes("WEBP"), "image/webp")
    image = _load(server.url("/a.webp"))
    assert image.size == (32, 24)
    assert image.mode == "RGB"


def test_url_source_respects_the_byte_limit(server: LoopbackServer) -> None:
    server.routes["/a.png"] = body_route(_noise_png())
    with pytest.raises(InvalidInput, match="larger than"):
        _load(server.url("/a.png"), max_bytes=100)


@pytest.mark.parametrize(
    ("body", "content_type", "got"),
    [
        (
            b"<!DOCTYPE html><html><body>Sign in</body></html>",
            "text/html; charset=utf-8",
            "text/html",
        ),
        (b"\x00\x01binary that is no image", "text/html", "text/html"),  # as served
        (b'{"error": "no such file"}', "application/json", "application/json"),
    ],
)
def test_a_url_serving_no_image_is_named_as_such(
    server: LoopbackServer, body: bytes, content_type: str, got: str
) -> None:
    """A page where an image was expected (a login page, an error body) is named for what it is,
    from its bytes or, when they say nothing, from the Content-Type it was served with."""
    server.routes["/photo"] = body_route(body, content_type)
    with pytest.raises(InvalidInput) as info:
        _load(server.url("/photo"))
    assert str(info.value).startswith(f"image_1: not an image (got {got})")
    assert info.value.field == "image_1"


def test_url_source_goes_through_the_ssrf_guard(server: LoopbackServer) -> None:
    server.routes["/a.png"] = body_route(make_image_bytes("PNG"))
    with pytest.raises(InvalidRequest, match="private"):
        load_input_image(server.url("/a.png"), field="image_1", fetcher=UrlFetcher())
    assert server.total_hits == 0


@pytest.mark.parametrize(
    "source",
    ["not base64 at all!", "data:image/png;base64,@@@@", "QUJD$", "A"],
)
def test_garbage_is_invalid_input(source: str) -> None:
    with pytest.raises(InvalidInput) as info:
        _load(source)
    assert info.value.field == "image_1"
    assert str(info.value).startswith("image_1: ")


def test_data_uri_without_comma() -> None:
    with pytest.raises(InvalidRequest):
        _load("data:image/png;base64")


def test_byte_limit_checked_before_decoding_base64() -> None:
    encoded = base64.b64encode(b"\0" * 4000).decode()
    with pytest.raises(InvalidInput, match="larger than 1000 bytes"):
        _load(encoded, max_bytes=1000)
    with pytest.raises(InvalidInput, match="larger than 1000 bytes"):
        _load(f"data:image/png;base64,{encoded}", max_bytes=1000)


# --- formats and corruption ---------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["GIF", "BMP", "TIFF"])
def test_other_formats_refused(image_format: str) -> None:
    encoded = base64.b64encode(make_image_bytes(image_format)).decode()
    with pytest.raises(InvalidInput, match=image_format) as info:
        _load(encoded)
    assert info.value.field == "image_1"


def test_truncated_jpeg_refused() -> None:
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buffer, "JPEG")
    data = buffer.getvalue()
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        _load(base64.b64encode(data[: len(data) // 2]).decode())


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [50_000, 8_000])
def test_decompression_bomb_refused_from_the_header(side: int) -> None:
    # 50000² trips Pillow's own guard, 8000² (64 MP) only ours; neither decodes a pixel.
    bomb = base64.b64encode(_png_header_only(side, side)).decode()
    started = time.monotonic()
    with pytest.raises(InvalidInput, match="pixels") as info:
        _load(bomb)
    assert time.monotonic() - started < 1
    assert info.value.field == "image_1"


def test_pixel_limit_is_configurable() -> None:
    encoded = base64.b64encode(make_image_bytes("PNG", size=(100, 100))).decode()
    with pytest.raises(InvalidInput, match="100x100"):
        _load(encoded, max_pixels=9_999)
    assert _load(encoded, max_pixels=10_000).size == (100, 100)


# --- pixel normalisation ------------------------------------------------------------------


def test_exif_orientation_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90° clockwise
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    upright = _load(base64.b64encode(buffer.getvalue()).decode())
    assert upright.size == (20, 40)
    top = upright.getpixel((10, 5))
    bottom = upright.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    loaded = _load(base64.b64encode(buffer.getvalue()).decode())
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 0, 0)
    assert loaded.getpixel((3, 1)) == (255, 255, 255)


def test_palette_transparency_composited_on_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    loaded = _load(base64.b64encode(buffer.getvalue()).decode())
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (0, 255, 0)


def test_sixteen_bit_grey_scaled_not_clipped() -> None:
    buffer = io.BytesIO()
    Image.new("I;16", (2, 2), 32768).save(buffer, "PNG")
    loaded = _load(base64.b64encode(buffer.getvalue()).decode())
    assert loaded.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("image_format", ["PNG", "WEBP"])
def test_animated_image_gives_first_frame(image_format: str) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    extra = {"lossless": True} if image_format == "WEBP" else {}
    frames[0].save(
        buffer, image_format, save_all=True, append_images=frames[1:], duration=100, **extra
    )
    loaded = _load(base64.b64encode(buffer.getvalue()).decode())
    assert loaded.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("size", [(10000, 10), (10, 10000), (1, 101)])
def test_extreme_aspect_is_refused_naming_the_field(size: tuple[int, int]) -> None:
    """The edit pipelines' resize would round the short side to 0 (issue 13)."""
    with pytest.raises(InvalidInput, match="sides may differ at most 100:1") as caught:
        _load(base64.b64encode(_png(*size)).decode())
    assert caught.value.field == "image_1"
    assert _load(base64.b64encode(_png(1000, 10)).decode()).size == (1000, 10)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()
