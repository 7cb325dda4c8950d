"""Inline input images are checked and stored at submit; the worker reads them back."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import pytest
from PIL import Image

from qwenserve.catalog import validate_request
from qwenserve.config import Settings
from qwenserve.errors import InvalidInput, InvalidRequest
from qwenserve.media.inline import STORED_PREFIX, store_inline_images, stored_media_id
from qwenserve.media.storage import LocalMediaStore
from qwenserve.store.records import request_text
from qwenserve.worker.inputs import MediaInputLoader

NOW = time.time()


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 80).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _edit_plus(**images: str) -> object:
    return validate_request(
        "qwen-image-edit-plus-product-photography", {"prompt": "on a table", **images}
    )


@pytest.fixture
def media(tmp_path: Path) -> LocalMediaStore:
    return LocalMediaStore(tmp_path / "media")


def _store(request: object, media: LocalMediaStore, **limits: int) -> tuple[object, list[str]]:
    return store_inline_images(
        request,  # type: ignore[arg-type]
        media,
        expires_at=NOW + 3600,
        max_bytes=limits.get("max_bytes", 10**7),
        max_pixels=limits.get("max_pixels", 10**7),
    )


def test_inline_images_are_stored_and_urls_left_alone(media: LocalMediaStore) -> None:
    png = _png()
    request = _edit_plus(
        image_1=base64.b64encode(png).decode(),
        image_2="https://example.com/b.png",
        image_3="data:image/png;base64," + base64.b64encode(png).decode(),
    )
    stored_request, ids = _store(request, media)
    sources = [i.source for i in stored_request.images]  # type: ignore[attr-defined]
    assert sources[1] == "https://example.com/b.png"
    assert [stored_media_id(s) for s in (sources[0], sources[2])] == ids and len(ids) == 2
    for media_id in ids:
        got = media.get(media_id, now=NOW)
        assert got is not None and got[0] == png
    kept = request_text(stored_request)  # type: ignore[arg-type]
    assert len(kept) < 1000, "no image bytes in the job record"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (base64.b64encode(b"GIF89a" + b"\0" * 40).decode(), "GIF"),
        (base64.b64encode(b"not an image at all").decode(), "not an image (got text/plain)"),
        (
            "data:image/png;base64," + base64.b64encode(b"<!DOCTYPE html><html>").decode(),
            "image_2: not an image (got text/html)",
        ),
        ("data:text/html,%00%01%02", "image_2: not an image (got text/html)"),
        ("QUJDR", "image_2"),  # base64 letters, but not a whole number of bytes
    ],
)
def test_a_bad_inline_image_is_refused_naming_its_field_and_nothing_stays(
    media: LocalMediaStore, source: str, needle: str
) -> None:
    request = _edit_plus(image_1=base64.b64encode(_png()).decode(), image_2=source)
    with pytest.raises(Exception) as caught:
        _store(request, media)
    assert getattr(caught.value, "field", None) == "image_2"
    assert needle in str(caught.value)
    assert list(media.root.rglob("*.bin")) == [], "the first image was stored, then removed"


def test_every_bad_inline_image_is_named_at_once(media: LocalMediaStore) -> None:
    html = base64.b64encode(b"<html><body>not found</body></html>").decode()
    request = _edit_plus(image_1=html, image_2=base64.b64encode(_png()).decode(), image_3="QUJDR")
    with pytest.raises(InvalidRequest) as caught:
        _store(request, media)
    assert [e.field for e in caught.value.errors] == ["image_1", "image_3"]
    assert "image_1: not an image (got text/html)" in caught.value.message
    assert list(media.root.rglob("*.bin")) == [], "the good image is not kept either"


def test_the_pixel_limit_is_checked_at_submit(media: LocalMediaStore) -> None:
    request = _edit_plus(image_1=base64.b64encode(_png((200, 100))).decode())
    with pytest.raises(InvalidInput, match="200x100"):
        _store(request, media, max_pixels=10_000)


def test_the_worker_loads_a_stored_image_and_says_when_it_is_gone(
    media: LocalMediaStore, tmp_path: Path
) -> None:
    png = _png()
    request, ids = _store(_edit_plus(image_1=base64.b64encode(png).decode()), media)
    loader = MediaInputLoader.from_settings(Settings(data_dir=tmp_path), media)
    [image] = loader.load_images(request)  # type: ignore[arg-type]
    assert image.tobytes() == Image.open(io.BytesIO(png)).convert("RGB").tobytes()
    media.delete(ids[0])
    with pytest.raises(InvalidInput, match="image_1: the uploaded image is gone"):
        loader.load_images(request)  # type: ignore[arg-type]
    assert STORED_PREFIX == "stored:"


class BoundedMedia(LocalMediaStore):
    """A media store with a per-item bound, as RedisMediaStore has."""

    def put(self, media_id: str, data: bytes, content_type: str, *, expires_at: float) -> None:
        if len(data) > 100:
            raise ValueError("item too large")
        super().put(media_id, data, content_type, expires_at=expires_at)


def test_an_image_over_the_media_stores_bound_is_a_400_not_a_500(tmp_path: Path) -> None:
    request = _edit_plus(image_1=base64.b64encode(_png()).decode())
    with pytest.raises(InvalidInput, match=r"image_1: the image .* too large to keep"):
        _store(request, BoundedMedia(tmp_path / "bounded"))  # type: ignore[arg-type]
