"""Where a job's denoising previews live: the media store, under ids chosen at submit.

The API picks an unguessable prefix when it accepts a job that wants previews and keeps it in
the job's request; the worker (in any process) stores preview ``i`` under
``preview_media_id(prefix, i)`` with the job's expiry, and the API node streaming the job reads
the same ids. So previews travel through the one store every process already shares (a local
folder or Redis) and nothing else has to carry them. A retried job stores the same previews
(same seed) under the same ids again.
"""

from __future__ import annotations

from qwenserve.media.storage import new_media_id

PREVIEW_CONTENT_TYPE = "image/png"


def new_preview_prefix() -> str:
    """A fresh unguessable prefix (the previews' ids are only known to the job's API node)."""
    return new_media_id()


def preview_media_id(prefix: str, index: int) -> str:
    """The media id of preview ``index`` (0-based) of the job with this prefix."""
    return f"{prefix}-p{index}"
