"""Sync inference (Segmind v1): submit to the same queue as v2 and wait for the result.

Answers the raw image bytes with the content type of ``image_format``, or with ``base64`` (or
``base_64``) true, JSON with the base64 image. A job that fails answers its error with the
status of its kind (400 naming the field for an unusable input, an input URL that could not be
fetched included, 500 for the engine, 422 for a content policy block: of the prompt at once,
nothing charged).
Past ``sync_timeout_s`` it answers 504; the job goes on and can still be read through v2 with
the request id in ``X-Request-ID``. A job cancelled meanwhile (through v2 with that id) answers
409 ``{"error": "cancelled ...", "status": "FAILED"}``. With ``cancel_on_disconnect`` (the
default), a caller that hangs up while waiting cancels its job: nobody is left to take the image;
unless it sent an ``Idempotency-Key``: then a retry with the same key and body is expected, and it
waits for the same job (and answers the same image) instead of running it again.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from qwenserve.api import idempotency, jobs
from qwenserve.api.auth import CurrentKey
from qwenserve.api.docs import add_slug_routes
from qwenserve.api.errors import error_response, error_responses
from qwenserve.api.schemas import IMAGE_CONTENT, CreditsBody, SyncBase64Body
from qwenserve.api.segmind import server_timing, submit_headers
from qwenserve.api.services import Services
from qwenserve.api.webhooks import refuse_on_v1
from qwenserve.errors import Conflict, UnknownRequest, UpstreamTimeout, rebuild_error
from qwenserve.jobs import JobStatus

router = APIRouter(tags=["v1 (sync)"])
log = logging.getLogger("qwenserve.api")


@router.get(
    "/v1/get-user-credits",
    summary="The calling key's credit balance (USD)",
    response_model=CreditsBody,
    responses=error_responses(401),
)
async def user_credits(key: CurrentKey) -> JSONResponse:
    return JSONResponse({"credits": round(key.balance_usd, 6), "free-credits": 0.0})


async def run_v1(slug: str, request: Request, key: CurrentKey) -> Response:
    services: Services = request.app.state.services
    refuse_on_v1(request)
    body = await jobs.read_json_body(request)
    idempotency_key = idempotency.header_value(request)
    submitted = await jobs.submit(
        services,
        key,
        slug,
        body,
        idempotency_key=idempotency_key,
        start_timeout_s=jobs.start_timeout(request),
    )
    headers = submit_headers(submitted)
    # With an Idempotency-Key a caller that hangs up will retry: its job is kept for the retry.
    cancel_if_gone = services.settings.cancel_on_disconnect and idempotency_key is None
    watch_caller = request.is_disconnected if cancel_if_gone else None
    awaited = await jobs.await_end(
        services, submitted.job.id, services.settings.sync_timeout_s, disconnected=watch_caller
    )
    job = awaited.job
    if awaited.disconnected:
        # It may have ended (or expired) meanwhile: then there is nothing to stop.
        with contextlib.suppress(Conflict, UnknownRequest):
            await jobs.cancel(services, key.id, submitted.job.id)
        log.info("job %s: its v1 caller disconnected while it was waiting", submitted.job.id)
        # Nobody reads this answer; it only closes the exchange.
        return error_response(UnknownRequest("the caller disconnected"), headers)
    if job is None:
        return error_response(UnknownRequest("the request expired before it finished"), headers)
    if job.status is JobStatus.FAILED:
        # The refund happened with the failure: report the balance after it, as stored.
        after = await services.call(services.store.get_key, key.id)
        if after is not None:
            headers["x-remaining-credits"] = f"{after.balance_usd:.6f}"
        return error_response(rebuild_error(job.error_kind, job.error or "failed"), headers)
    if job.status is not JobStatus.COMPLETED or job.result is None:
        timeout = UpstreamTimeout(
            f"no result within {services.settings.sync_timeout_s:g}s; the request goes on: "
            f"poll /v2/requests/{job.id}/status"
        )
        return error_response(timeout, headers)

    result = job.result
    stored = await services.call(services.media.get, result.media_id, now=services.clock())
    if stored is None:
        return error_response(UnknownRequest("the result expired before it was read"), headers)
    data, content_type = stored
    headers["x-generation-time"] = f"{result.inference_time_s:.4f}"
    headers["Server-Timing"] = server_timing(job)
    headers["x-output-metadata"] = json.dumps(
        {"width": result.width, "height": result.height, "seed": result.seed}
    )
    if submitted.request.base64:
        return JSONResponse(
            {
                "image": base64.b64encode(data).decode("ascii"),
                "status": "Success",
                "request_id": job.id,
                "seed": result.seed,
                "width": result.width,
                "height": result.height,
                "content_type": content_type,
                "inference_time": round(result.inference_time_s, 4),
            },
            headers=headers,
        )
    return Response(content=data, media_type=content_type, headers=headers)


RUN_V1_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The image bytes; with `base64` (`base_64`) true, JSON with the image",
        "model": SyncBase64Body,
        "content": IMAGE_CONTENT,
    },
    **error_responses(
        400,
        401,
        403,
        404,
        406,
        409,
        422,
        429,
        500,
        503,
        504,
        meanings={
            400: "Invalid parameters or an unusable input (an input URL that could not be "
            "fetched included): `errors` names every bad field",
            404: "The result expired before it was read",
            409: "The job was cancelled meanwhile (`status`: FAILED)",
            504: "No result within the sync timeout (poll the X-Request-ID through v2)",
        },
    ),
}
add_slug_routes(
    router, "/v1/{slug}", run_v1, summary="{title}: run and wait", responses=RUN_V1_RESPONSES
)
