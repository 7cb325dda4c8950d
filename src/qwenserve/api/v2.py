"""Async inference (Segmind v2): submit to the queue, poll the status, fetch the result; and
qwenserve's additions: follow a job live (SSE) and cancel it.

FAILED is served as 422 with the body on both read endpoints (Segmind does, and its SDK relies
on the body's ``status`` to tell a FAILED job from a transport error); unknown, expired or
another key's ids are 404. The status and result bodies carry live fields while a job is
unfinished (``api/live.py``: queue position, progress, ETA), additive to Segmind's.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from qwenserve.api import idempotency, jobs, segmind, webhooks
from qwenserve.api.auth import CurrentKey
from qwenserve.api.docs import add_slug_routes
from qwenserve.api.errors import error_responses
from qwenserve.api.live import live_view, owned_live_view
from qwenserve.api.schemas import EVENT_STREAM, ResultBody, StatusBody, SubmitBody
from qwenserve.api.services import Services
from qwenserve.api.stream import job_stream
from qwenserve.jobs import JobEvent, JobStatus

router = APIRouter(tags=["v2 (async)"])

SSE_PING_S = 15.0

# Segmind answers a FAILED job's reads with 422 and the status body (its SDK reads `status`).
FAILED_422: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "The request FAILED: the same body, with `status` FAILED and its `error`",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}
READ_RESPONSES = {
    **error_responses(401, 404, meanings={404: "Unknown, expired, or another key's request"}),
    **FAILED_422,
}


async def submit_v2(slug: str, request: Request, key: CurrentKey) -> JSONResponse:
    services: Services = request.app.state.services
    body = await jobs.read_json_body(request)
    webhook = webhooks.webhook_url(request, allow_private=services.settings.allow_private_urls)
    idempotency_key = idempotency.header_value(request)
    submitted = await jobs.submit(
        services,
        key,
        slug,
        body,
        webhook_url=webhook,
        idempotency_key=idempotency_key,
        start_timeout_s=jobs.start_timeout(request),
    )
    urls = segmind.urls(services, request, submitted.job.id)
    return JSONResponse(
        {
            "request_id": submitted.job.id,
            # FAILED for a request the content policy refused at submit; else QUEUED.
            "status": (
                JobStatus.FAILED if submitted.job.status is JobStatus.FAILED else JobStatus.QUEUED
            ).value,
            **urls,
            "poll_url": urls["status_url"],
        },
        headers=segmind.submit_headers(submitted),
    )


SUBMIT_RESPONSES = error_responses(
    400,
    401,
    403,
    404,
    406,
    409,
    429,
    503,
    meanings={
        404: "The request an Idempotency-Key first made has expired",
        409: "The Idempotency-Key was used with another body",
    },
)


@router.get(
    "/v2/requests/{request_id}/status",
    summary="Poll a request's state",
    response_model=StatusBody,
    responses=READ_RESPONSES,
)
async def status_v2(request_id: str, request: Request, key: CurrentKey) -> JSONResponse:
    services: Services = request.app.state.services
    live = await owned_live_view(services, key.id, request_id)
    body = segmind.status_body(services, request, live)
    body.update(await webhooks.webhook_fields(services, live.job))
    return JSONResponse(body, status_code=segmind.status_code(live.job))


@router.get(
    "/v2/requests/{request_id}",
    summary="Fetch a request's result",
    response_model=ResultBody,
    responses=READ_RESPONSES,
)
async def result_v2(request_id: str, request: Request, key: CurrentKey) -> JSONResponse:
    services: Services = request.app.state.services
    live = await owned_live_view(services, key.id, request_id)
    body = await segmind.result_body(services, request, live)
    body.update(await webhooks.webhook_fields(services, live.job))
    return JSONResponse(body, status_code=segmind.status_code(live.job))


@router.get(
    "/v2/requests/{request_id}/events",
    summary="Follow a request live (Server-Sent Events; resumable with Last-Event-ID)",
    response_class=EventSourceResponse,
    responses={
        200: {"description": "The job's events, until it ends", "content": EVENT_STREAM},
        **error_responses(
            400, 401, 404, meanings={400: "Last-Event-ID is none of this request's event ids"}
        ),
    },
)
async def events_v2(
    request_id: str,
    request: Request,
    key: CurrentKey,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> EventSourceResponse:
    services: Services = request.app.state.services
    job = await jobs.owned_job(services, key, request_id)
    after = last_event_id.strip() if last_event_id and last_event_id.strip() else None
    # Read (and so validate: 400 for an id that is none of the store's) before streaming.
    backlog: list[JobEvent] = await services.call(services.store.job_events, job.id, after=after)
    links = segmind.urls(services, request, job.id)
    return EventSourceResponse(
        job_stream(services, job, after=after, backlog=backlog, links=links),
        ping=SSE_PING_S,
        headers={"Cache-Control": "no-store"},
    )


CANCEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "model": StatusBody,
        "description": "Running: `cancel_requested` true; it stops at its next step, refunded",
    },
    **error_responses(401, 404, 409, meanings={409: "It had already ended (`status` says how)"}),
}


@router.post(
    "/v2/requests/{request_id}/cancel",
    summary="Cancel a request (200: ended, refunded; 202: running, stops at its next step)",
    response_model=StatusBody,
    responses=CANCEL_RESPONSES,
)
@router.delete(
    "/v2/requests/{request_id}",
    summary="Cancel a request (alias of POST .../cancel)",
    response_model=StatusBody,
    responses=CANCEL_RESPONSES,
)
async def cancel_v2(request_id: str, request: Request, key: CurrentKey) -> JSONResponse:
    services: Services = request.app.state.services
    job = await jobs.cancel(services, key.id, request_id)
    live = await live_view(services, job)
    body = segmind.status_body(services, request, live)
    return JSONResponse(body, status_code=200 if job.status.is_terminal else 202)


# After the polls above: a router tries its routes in order, and polls outnumber submits.
add_slug_routes(
    router,
    "/v2/{slug}",
    submit_v2,
    summary="{title}: queue",
    responses=SUBMIT_RESPONSES,
    response_model=SubmitBody,
)
