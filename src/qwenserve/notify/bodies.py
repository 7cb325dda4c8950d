"""A job's Segmind v2 bodies (``GET /v2/requests/{id}/status`` and ``GET /v2/requests/{id}``),
built from the job alone: pure functions, no HTTP request, no I/O.

The API's polls (``api/segmind.py``) and each webhook delivery (``notify/webhooks.py``) build
their bodies here, so a delivery POSTs exactly what a poll of the ended job answers. It lives
below both (``api`` imports ``notify``; ``notify`` never imports ``api``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from qwenserve.jobs import Job, JobStatus

NO_LIVE_FIELDS: Mapping[str, Any] = {}


def urls(base_url: str, job_id: str) -> dict[str, str]:
    """Where the job is polled and read (``base_url``: how clients reach the API)."""
    return {
        "status_url": f"{base_url}/v2/requests/{job_id}/status",
        "response_url": f"{base_url}/v2/requests/{job_id}",
    }


def metrics(job: Job) -> dict[str, Any]:
    """Its cost (0 once refunded), queue wait and inference seconds."""
    out: dict[str, Any] = {"cost": job.cost_usd}
    if job.queue_time_s is not None:
        out["queue_time"] = round(job.queue_time_s, 4)
    if job.result is not None:
        out["inference_time"] = round(job.result.inference_time_s, 4)
    return out


def wants_base64(job: Job) -> bool:
    """Whether its result body carries the image itself (``base64: true``) rather than a URL."""
    return bool(job.request.base64)


def status_body(
    job: Job, *, base_url: str, live: Mapping[str, Any] = NO_LIVE_FIELDS
) -> dict[str, Any]:
    """The status body: Segmind's fields, then ``live`` ones (``api/live.py``; none once ended)."""
    body: dict[str, Any] = {
        "status": job.status.value,
        "request_id": job.id,
        **urls(base_url, job.id),
        "metrics": metrics(job),
    }
    if job.status is JobStatus.FAILED:
        body["error"] = job.error
    body.update(live)
    return body


def result_body(
    job: Job,
    *,
    base_url: str,
    image: bytes | None = None,
    live: Mapping[str, Any] = NO_LIVE_FIELDS,
) -> dict[str, Any]:
    """The result body: the output once COMPLETED (its URL, or ``image`` base64-encoded when the
    request asked for base64: the caller reads it from the media store), else the ``live``
    fields."""
    body: dict[str, Any] = {
        "status": job.status.value,
        "request_id": job.id,
        "model": job.slug,
        "output": None,
        "metrics": metrics(job),
    }
    if job.status is JobStatus.FAILED:
        body["error"] = job.error
    if job.result is not None:
        result = job.result
        body.update(
            seed=result.seed,
            width=result.width,
            height=result.height,
            content_type=result.content_type,
        )
        if wants_base64(job):
            body["output"] = base64.b64encode(image).decode("ascii") if image is not None else None
        else:
            body["output"] = f"{base_url}/media/{result.media_id}"
    body.update(live)
    return body


def render(body: Mapping[str, Any]) -> str:
    """JSON as the API's responses write it (compact, UTF-8, no NaN)."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
