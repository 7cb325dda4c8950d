"""What Segmind's v1 and v2 share: response headers and the v2 bodies (status, result), built
once so the poll, the cancel answer and the event stream say the same thing."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from qwenserve.api.jobs import Submitted
from qwenserve.api.live import LiveView
from qwenserve.api.services import Services
from qwenserve.errors import UnknownRequest
from qwenserve.jobs import Job, JobStatus
from qwenserve.notify import bodies


def submit_headers(submitted: Submitted) -> dict[str, str]:
    """The headers of an accepted submit: the request id, the balance, the rate window."""
    headers = {
        "X-Request-ID": submitted.job.id,
        "x-remaining-credits": f"{submitted.outcome.remaining_usd:.6f}",
    }
    if submitted.outcome.rate_limit_remaining is not None:
        headers["x-rate-limit-remaining"] = str(submitted.outcome.rate_limit_remaining)
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    return headers


def urls(services: Services, request: Request, job_id: str) -> dict[str, str]:
    return bodies.urls(services.base_url(request), job_id)


def server_timing(job: Job) -> str:
    """The ``Server-Timing`` header of a finished job: queue wait, inference and encoding, in
    milliseconds (a browser's dev tools and curl -v show them; no Segmind equivalent)."""
    parts = []
    if job.queue_time_s is not None:
        parts.append(f"queue;dur={job.queue_time_s * 1000:.1f}")
    if job.result is not None:
        parts.append(f"inference;dur={job.result.inference_time_s * 1000:.1f}")
        parts.append(f"encode;dur={job.result.encode_time_s * 1000:.1f}")
    return ", ".join(parts)


def status_code(job: Job) -> int:
    """FAILED is 422 with its body (Segmind's SDK reads the body's status to tell it apart)."""
    return 422 if job.status is JobStatus.FAILED else 200


def status_body(services: Services, request: Request, live: LiveView) -> dict[str, Any]:
    """``GET /v2/requests/{id}/status``: Segmind's fields, then the live ones (api/live.py);
    built by ``notify/bodies.py``, as webhook deliveries are."""
    return bodies.status_body(live.job, base_url=services.base_url(request), live=live.fields())


async def result_body(services: Services, request: Request, live: LiveView) -> dict[str, Any]:
    """``GET /v2/requests/{id}``: the output (URL, or base64 when asked) once COMPLETED; the
    live fields while unfinished (``notify/bodies.py`` builds it)."""
    job = live.job
    image: bytes | None = None
    if job.result is not None and bodies.wants_base64(job):
        stored = await services.call(services.media.get, job.result.media_id, now=services.clock())
        if stored is None:
            raise UnknownRequest(f"request '{job.id}' not found (unknown or expired)")
        image = stored[0]
    return bodies.result_body(
        job, base_url=services.base_url(request), image=image, live=live.fields()
    )
