"""What Segmind's v1 and v2 share: response headers and the v2 bodies (status, result), built
once so the poll, the cancel answer and the event stream say the same thing."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import Request

from qwenserve.api.jobs import Submitted
from qwenserve.api.live import LiveView
from qwenserve.api.services import Services
from qwenserve.errors import UnknownRequest
from qwenserve.jobs import Job, JobStatus


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
    base = services.base_url(request)
    return {
        "status_url": f"{base}/v2/requests/{job_id}/status",
        "response_url": f"{base}/v2/requests/{job_id}",
    }


def metrics(job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {"cost": job.cost_usd}
    if job.queue_time_s is not None:
        out["queue_time"] = round(job.queue_time_s, 4)
    if job.result is not None:
        out["inference_time"] = round(job.result.inference_time_s, 4)
    return out


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
    """``GET /v2/requests/{id}/status``: Segmind's fields, then the live ones (api/live.py)."""
    job = live.job
    body: dict[str, Any] = {
        "status": job.status.value,
        "request_id": job.id,
        **urls(services, request, job.id),
        "metrics": metrics(job),
    }
    if job.status is JobStatus.FAILED:
        body["error"] = job.error
    body.update(live.fields())
    return body


async def result_body(services: Services, request: Request, live: LiveView) -> dict[str, Any]:
    """``GET /v2/requests/{id}``: the output (URL, or base64 when asked) once COMPLETED; the
    live fields while unfinished."""
    job = live.job
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
        if job.params.get("base64"):
            stored = await services.call(services.media.get, result.media_id, now=services.clock())
            if stored is None:
                raise UnknownRequest(f"request '{job.id}' not found (unknown or expired)")
            body["output"] = base64.b64encode(stored[0]).decode("ascii")
        else:
            body["output"] = f"{services.base_url(request)}/media/{result.media_id}"
    body.update(live.fields())
    return body
