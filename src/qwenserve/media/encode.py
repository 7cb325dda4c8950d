"""Encoding a generated image into the bytes a client downloads (PNG, JPEG or WEBP)."""

from __future__ import annotations

import io

from PIL import Image


def encode_image(image: Image.Image, image_format: str, quality: int) -> bytes:
    """Encode ``image`` as ``image_format`` ("png", "jpeg" or "webp").

    ``quality`` (1-100) applies to jpeg and webp; png is lossless and ignores it, and is written
    without Pillow's ``optimize`` pass, which costs several times the encode time for a few
    percent of size. Raises ValueError for another format (the catalog validated it already).
    """
    kind = image_format.lower()
    buffer = io.BytesIO()
    if kind == "png":
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buffer, format="PNG", optimize=False)
    elif kind in ("jpeg", "jpg"):
        if image.mode != "RGB":
            image = image.convert("RGB")
        image.save(buffer, format="JPEG", quality=quality)
    elif kind == "webp":
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {image_format!r}; expected png, jpeg or webp")
    return buffer.getvalue()
