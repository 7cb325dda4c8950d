"""Turning a client's input image (URL, data URI or base64) into a safe RGB Pillow image.

Input images are untrusted bytes, so decoding is defensive: the byte size is bounded before any
base64 is decoded, only PNG, JPEG and WEBP are opened (by what Pillow detects, not what a data
URI claims), and the pixel count is read from the header and refused before pixels are
decoded, so a small file cannot expand into gigabytes (a decompression bomb).
"""

from __future__ import annotations

import binascii
import io
import re
import urllib.parse

from PIL import Image, ImageOps, UnidentifiedImageError

from qwenserve.errors import InvalidInput, InvalidRequest
from qwenserve.media.fetch import DEFAULT_MAX_BYTES, UrlFetcher

DEFAULT_MAX_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 100
"""Longest side over shortest side of an input image. The edit pipelines resize each input to a
fixed area at its own aspect, sides rounded to 32 px (``calculate_dimensions``): past an aspect
of area/256 the short side rounds to 0 (576 at the 384² condition area, 256 at the tiny
preset's) and the vision-language processor refuses an aspect over 200. 100 keeps a margin
under all of them; such images are refused with a 400 naming the field, not a crash."""
# MPO is how Pillow names JPEGs carrying extra pictures (most phone cameras write them).
_ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_KNOWN_REFUSED = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def load_input_image(
    source: str,
    *,
    field: str,
    fetcher: UrlFetcher,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Fetch or decode ``source`` and return it as an RGB image, upright per its EXIF.

    ``source`` is an http(s) URL (fetched through ``fetcher``), a ``data:`` URI or raw base64
    (whitespace, the URL-safe alphabet and missing padding are tolerated). Transparency is
    composited on white and an animated image gives its first frame.

    Raises InvalidInput (too large, not PNG/JPEG/WEBP, too many pixels, corrupt) naming
    ``field``, and whatever ``fetcher`` raises for a URL.
    """
    data = inline_image_bytes(source, field=field, max_bytes=max_bytes)
    declared = data_uri_type(source)
    if data is None:
        data, declared = fetcher.fetch_typed(source.strip(), field=field, max_bytes=max_bytes)
    return decode_image(data, field=field, max_pixels=max_pixels, declared_type=declared)


def data_uri_type(source: str) -> str | None:
    """The media type a ``data:`` URI claims (None for anything else): only ever used to say
    what was sent instead of an image, never to decode."""
    text = source.strip()
    if text[:5].lower() != "data:":
        return None
    header = text[5 : text.find(",")] if "," in text else ""
    return header.split(";", 1)[0].strip().lower() or None


def inline_image_bytes(source: str, *, field: str, max_bytes: int) -> bytes | None:
    """The bytes of a ``data:`` URI or raw base64 source; None for an http(s) URL."""
    text = source.strip()
    head = text[:16].lower()
    if head.startswith(("http://", "https://")):
        return None
    if head.startswith("data:"):
        return _decode_data_uri(text, field=field, max_bytes=max_bytes)
    return _decode_base64(text, field=field, max_bytes=max_bytes)


def _open_checked(
    data: bytes, *, field: str, max_pixels: int, declared_type: str | None = None
) -> Image.Image:
    """Open ``data`` (header only: no pixel is decoded) and check format and pixel count.
    ``declared_type``: what the bytes were served or labelled as (a URL's Content-Type, a data
    URI's media type), named in the refusal when they are not an image."""
    if not data:
        raise InvalidInput(f"{field}: the image is empty", field=field)
    try:
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError as exc:
        reason = _unsupported_reason(data, declared_type)
        raise InvalidInput(f"{field}: {reason}", field=field) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its warning, when warnings are errors, arrives as an exception).
        raise InvalidInput(
            f"{field}: the image has more than {max_pixels} pixels", field=field
        ) from exc
    except Exception as exc:
        raise InvalidInput(f"{field}: the image header is corrupt", field=field) from exc
    try:
        if image.format not in _ACCEPTED_FORMATS:  # pragma: no cover - formats= restricts this
            raise InvalidInput(f"{field}: {_unsupported_reason(data, None)}", field=field)
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidInput(f"{field}: the image has no pixels", field=field)
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InvalidInput(
                f"{field}: the image is {width}x{height}; its sides may differ at most "
                f"{MAX_ASPECT_RATIO}:1",
                field=field,
            )
        if width * height > max_pixels:
            raise InvalidInput(
                f"{field}: the image is {width}x{height}, more than {max_pixels} pixels",
                field=field,
            )
    except BaseException:
        image.close()
        raise
    return image


def check_image_header(
    data: bytes,
    *,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    declared_type: str | None = None,
) -> None:
    """Raise InvalidInput naming ``field`` unless ``data`` opens as a PNG, JPEG or WEBP of at
    most ``max_pixels`` (cheap: reads the header; truncated pixel data is found at decode)."""
    _open_checked(data, field=field, max_pixels=max_pixels, declared_type=declared_type).close()


def decode_image(
    data: bytes,
    *,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    declared_type: str | None = None,
) -> Image.Image:
    """Decode image bytes (PNG, JPEG or WEBP) into an upright RGB image; see load_input_image."""
    image = _open_checked(data, field=field, max_pixels=max_pixels, declared_type=declared_type)
    with image:
        try:
            image.seek(0)  # animated PNG/WEBP: the first frame
            image.load()
        except Exception as exc:
            # Untrusted bytes can make Pillow's decoders raise nearly any exception type
            # (OSError for truncation, SyntaxError, ValueError, struct.error, ...).
            raise InvalidInput(
                f"{field}: the image data is truncated or corrupt", field=field
            ) from exc
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:
            upright = image  # an unreadable EXIF block only loses the orientation hint
        # Closing the opened image frees its pixels, so never return it itself.
        return _to_rgb(upright, owned=upright is not image)


def _to_rgb(image: Image.Image, *, owned: bool) -> Image.Image:
    """RGB, with transparency composited on white and 16-bit grey scaled (not clipped)."""
    if image.mode == "RGB":
        return image if owned else image.copy()
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        grey = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
        return grey.convert("RGB")
    has_alpha = "A" in image.getbands() or image.mode in ("RGBa", "La", "PA")
    if has_alpha or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _unsupported_reason(data: bytes, declared_type: str | None) -> str:
    """Why bytes Pillow did not open are refused, naming what they are when that is known:
    "not an image (got text/html)" for a web page, the format for a refused image type."""
    for magic, name in _KNOWN_REFUSED:
        if data.startswith(magic):
            return f"{name} images are not supported; send PNG, JPEG or WEBP"
    declared = (declared_type or "").split(";", 1)[0].strip().lower() or None
    sniffed = _sniff_type(data)
    if sniffed is None and declared is not None and not declared.startswith("image/"):
        sniffed = declared  # what it was served as, when the bytes say nothing clearer
    if sniffed is not None and not sniffed.startswith("image/"):
        return f"not an image (got {sniffed}); send PNG, JPEG or WEBP"
    shown = sniffed or declared
    got = f" (got {shown})" if shown else ""
    return f"not a PNG, JPEG or WEBP image{got}"


def _sniff_type(data: bytes) -> str | None:
    """The media type of common non-image bytes (what a wrong URL usually serves), or None."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "text/html"
    if head.startswith((b"<svg", b"<?xml")):
        return "image/svg+xml" if b"<svg" in head else "application/xml"
    if head.startswith(b"%pdf"):
        return "application/pdf"
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at 4096 bytes still reads as text; other bytes do not.
        try:
            text = data[:4093].decode("utf-8")
        except UnicodeDecodeError:
            return None
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return "application/json"
    if text and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return "text/plain"
    return None


def _too_large(field: str, max_bytes: int) -> InvalidInput:
    return InvalidInput(f"{field}: the image is larger than {max_bytes} bytes", field=field)


def _decode_data_uri(text: str, *, field: str, max_bytes: int) -> bytes:
    header, comma, payload = text.partition(",")
    if not comma:
        raise InvalidRequest(f"{field}: the data URI has no ',' before its data", field=field)
    # The media type the URI claims is ignored: Pillow identifies the bytes themselves.
    if header.lower().endswith(";base64"):
        if "%" in payload:
            payload = urllib.parse.unquote(payload)
        return _decode_base64(payload, field=field, max_bytes=max_bytes)
    if len(payload) > 3 * max_bytes:
        raise _too_large(field, max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _too_large(field, max_bytes)
    return data


def _decode_base64(text: str, *, field: str, max_bytes: int) -> bytes:
    # Cheap bound first (generous for line breaks), then the exact one on the compacted text.
    if len(text) > 2 * max_bytes + 4096:
        raise _too_large(field, max_bytes)
    compact = "".join(text.split())
    if len(compact) // 4 * 3 > max_bytes + 3:
        raise _too_large(field, max_bytes)
    if not compact or not _BASE64_RE.match(compact):
        raise InvalidInput(
            f"{field}: not an http(s) URL, a data URI or valid base64 image data", field=field
        )
    compact = compact.rstrip("=")
    if len(compact) % 4 == 1:
        raise InvalidInput(f"{field}: the base64 data has an impossible length", field=field)
    padded = compact.translate(_URLSAFE_TO_STANDARD) + "=" * (-len(compact) % 4)
    try:
        data = binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error as exc:
        raise InvalidInput(f"{field}: the base64 data is invalid", field=field) from exc
    if len(data) > max_bytes:
        raise _too_large(field, max_bytes)
    return data
