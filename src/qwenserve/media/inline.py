"""Inline input images (base64, data URIs) leave the job record at submit.

A request may carry its input images inline: up to ``max_input_bytes`` each, a third more as
base64. Kept in the job's parameters, every read of the job (a status poll, a claim, a v1
waiter) would carry and parse those megabytes. So at submit the API decodes each inline image
once, checks it is a PNG/JPEG/WEBP within the pixel limit (a bad one is a 400 naming its field
before anything is charged), stores the bytes in the media store with the job's expiry, and
the job keeps a short ``stored:<media id>`` reference that the worker reads back. The worker
deletes them once the job has ended (completed or failed; a job given back to the queue keeps
them for its next attempt), else they go with the request's expiry. URLs are left as they are:
the worker fetches them, through its SSRF guard, when the job runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from qwenserve.catalog import GenerationRequest
from qwenserve.catalog.request import InputImage
from qwenserve.errors import FieldError, InvalidInput, InvalidRequest
from qwenserve.media.inputs import check_image_header, data_uri_type, inline_image_bytes
from qwenserve.media.storage import MediaStore, new_media_id

STORED_PREFIX = "stored:"
STORED_CONTENT_TYPE = "application/octet-stream"


def stored_media_id(source: str) -> str | None:
    """The media id of a ``stored:`` reference; None for anything else (URL, base64)."""
    return source[len(STORED_PREFIX) :] if source.startswith(STORED_PREFIX) else None


def store_inline_images(
    request: GenerationRequest,
    media: MediaStore,
    *,
    expires_at: float,
    max_bytes: int,
    max_pixels: int,
) -> tuple[GenerationRequest, list[str]]:
    """``request`` with its inline images stored and referenced; also the new media ids.

    Raises one InvalidRequest naming every image that is too large, not base64, not a
    PNG/JPEG/WEBP or over the pixel limit; nothing stays stored then.
    """
    decoded, refusals = _decoded(request.images, max_bytes=max_bytes, max_pixels=max_pixels)
    if len(refusals) == 1:
        raise refusals[0]
    if refusals:
        raise InvalidRequest.from_errors([e for refused in refusals for e in refused.errors])
    stored: list[str] = []
    images: list[InputImage] = []
    try:
        for image, data in decoded:
            if data is None:  # a URL: fetched by the worker
                images.append(image)
                continue
            media_id = new_media_id()
            try:
                media.put(media_id, data, STORED_CONTENT_TYPE, expires_at=expires_at)
            except ValueError as error:  # over the media store's own item bound
                raise InvalidInput(
                    f"{image.field}: the image ({len(data)} bytes) is too large to keep",
                    field=image.field,
                ) from error
            stored.append(media_id)
            images.append(InputImage(image.field, STORED_PREFIX + media_id))
    except BaseException:
        forget(media, stored)
        raise
    return dataclasses.replace(request, images=tuple(images)), stored


def inline_image_problems(
    images: Sequence[InputImage], *, max_bytes: int, max_pixels: int
) -> list[FieldError]:
    """Each inline image's problem (undecodable, too large, not a PNG/JPEG/WEBP image, over the
    pixel limit), without keeping anything; URLs are the worker's to fetch."""
    refusals = _decoded(images, max_bytes=max_bytes, max_pixels=max_pixels)[1]
    return [problem for refused in refusals for problem in refused.errors]


def _decoded(
    images: Sequence[InputImage], *, max_bytes: int, max_pixels: int
) -> tuple[list[tuple[InputImage, bytes | None]], list[InvalidRequest]]:
    """Each image with its checked inline bytes (None for a URL), and each bad one's refusal."""
    decoded: list[tuple[InputImage, bytes | None]] = []
    refusals: list[InvalidRequest] = []
    for image in images:
        try:
            data = inline_image_bytes(image.source, field=image.field, max_bytes=max_bytes)
            if data is not None:
                check_image_header(
                    data,
                    field=image.field,
                    max_pixels=max_pixels,
                    declared_type=data_uri_type(image.source),
                )
        except InvalidRequest as refused:
            refusals.append(refused)
            continue
        decoded.append((image, data))
    return decoded, refusals


def stored_input_ids(request: GenerationRequest) -> list[str]:
    """The media ids of a job's stored inline inputs (from its request's images)."""
    ids = []
    for image in request.images:
        media_id = stored_media_id(image.source)
        if media_id is not None:
            ids.append(media_id)
    return ids


def forget(media: MediaStore, media_ids: Sequence[str]) -> None:
    """Delete stored inputs of a request that was not accepted after all."""
    for media_id in media_ids:
        media.delete(media_id)
