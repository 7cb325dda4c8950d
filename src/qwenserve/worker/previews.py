"""Storing the previews a job asked for (OpenAI's ``partial_images``) where its API node reads
them: the media store, under the ids chosen at submit (``media/previews.py``).

Stored on the engine thread, at the step the engine made them: at most three small PNGs per
job, and storing them before denoising goes on means every preview is in the media store
before the job can complete, so a watcher that sees the job end has seen (or can still read)
all of them. A preview that cannot be stored is logged and skipped; the job goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from qwenserve.catalog import GenerationRequest
from qwenserve.jobs import Job
from qwenserve.media.encode import encode_png
from qwenserve.media.previews import PREVIEW_CONTENT_TYPE, preview_media_id
from qwenserve.media.storage import MediaStore

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("qwenserve.worker")


def wants_previews(requests: Sequence[GenerationRequest]) -> bool:
    return any(r.partial_images > 0 and r.preview_id for r in requests)


def preview_saver(
    jobs: Sequence[Job],
    requests: Sequence[GenerationRequest],
    media: MediaStore,
) -> Callable[[int, int, Image.Image], None]:
    """The engine's ``on_preview`` for one call over ``jobs`` (in the call's order)."""

    def save(index: int, preview_index: int, image: Image.Image) -> None:
        job, request = jobs[index], requests[index]
        if not request.preview_id or preview_index >= request.partial_images:
            return
        media_id = preview_media_id(request.preview_id, preview_index)
        try:
            media.put(media_id, encode_png(image), PREVIEW_CONTENT_TYPE, expires_at=job.expires_at)
        except Exception:
            log.warning("job %s: preview %d not stored", job.id, preview_index, exc_info=True)
            return
        log.debug("job %s: preview %d stored", job.id, preview_index)

    return save
