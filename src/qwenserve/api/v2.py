"""Async inference (Segmind v2): submit to the queue, poll the status, fetch the result.

FAILED is served as 422 with the body on both read endpoints (Segmind does, and its SDK relies
on the body's ``status`` to tell a FAILED job from a transport error); unknown, expired or
another key's ids are 404.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from qwenserve.api.auth import CurrentKey
from qwenserve.api.services import Services, read_json_body, submit, submit_headers
from qwenserve.errors import UnknownRequest
from qwenserve.jobs import Job, JobStatus
from qwenserve.store.base import ApiKey

router = APIRouter(tags=["v2 (async)"])


def _urls(services: Services, request: Request, job_id: str) -> dict[str, str]:
    base = services.base_url(request)
    return {
        "status_url": f"{base}/v2/requests/{job_id}/status",
        "response_url": f"{base}/v2/requests/{job_id}",
    }


def _metrics(job: Job) -> dict[str, Any]:
    metrics: dict[str, Any] = {"cost": job.cost_usd}
    if job.queue_time_s is not None:
        metrics["queue_time"] = round(job.queue_time_s, 4)
    if job.result is not None:
        metrics["inference_time"] = round(job.result.inference_time_s, 4)
    return metrics


async def _owned_job(services: Services, key: ApiKey, request_id: str) -> Job:
    job: Job | None = await services.call(services.store.get_job, request_id, now=services.clock())
    if job is None or job.key_id != key.id:
        raise UnknownRequest(f"request '{request_id}' not found (unknown or expired)")
    return job


def _status_code(job: Job) -> int:
    return 422 if job.status is JobStatus.FAILED else 200


@router.post("/v2/{slug}", summary="Submit a request to the queue")
async def submit_v2(slug: str, request: Request, key: CurrentKey) -> JSONResponse:
    services: Services = request.app.state.services
    body = await read_json_body(request)
    submitted = await submit(services, key, slug, body)
    urls = _urls(services, request, submitted.job.id)
    return JSONResponse(
        {
            "request_id": submitted.job.id,
            "status": JobStatus.QUEUED.value,
            **urls,
            "poll_url": urls["status_url"],
        },
        headers=submit_headers(submitted),
    )


@router.get("/v2/requests/{request_id}/status", summary="Poll a request's state")
async def status_v2(request_id: str, request: Request, key: CurrentKey) -> JSONResponse:
    services: Services = request.app.state.services
    job = await _owned_job(services, key, request_id)
    body: dict[str, Any] = {
        "status": job.status.value,
        "request_id": job.id,
        **_urls(services, request, job.id),
        "metrics": _metrics(job),
    }
    if job.status is JobStatus.FAILED:
        body["error"] = job.error
    return JSONResponse(body, status_code=_status_code(job))


@router.get("/v2/requests/{request_id}", summary="Fetch a request's result")
async def result_v2(request_id: str, request: Request, key: CurrentKey) -> JSONResponse:
    services: Services = request.app.state.services
    job = await _owned_job(services, key, request_id)
    body: dict[str, Any] = {
        "status": job.status.value,
        "request_id": job.id,
        "model": job.slug,
        "output": None,
        "metrics": _metrics(job),
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
                raise UnknownRequest(f"request '{request_id}' not found (unknown or expired)")
            body["output"] = base64.b64encode(stored[0]).decode("ascii")
        else:
            body["output"] = f"{services.base_url(request)}/media/{result.media_id}"
    return JSONResponse(body, status_code=_status_code(job))
