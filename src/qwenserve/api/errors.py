"""The ONE place errors become HTTP responses, with the error's status, in each dialect's shape.

Segmind's routes answer ``{"error": "..."}``; OpenAI's (``/v1/images/...``) answer
``{"error": {"message", "type", "param", "code"}}`` (``openai_body``): two renderers of the same
tree, chosen by the route prefix, so a handler never knows which shape it answers in.

An ``InvalidRequest`` (400) also lists every bad field: ``{"error": "steps must be …; seed
must be …", "errors": [{"field": "steps", "message": "steps must be …"}, …]}`` (``error`` names
them all, as Segmind's SDK shows only that string; ``errors`` is never empty: a body-level
problem, such as malformed JSON, is listed under ``"field": "body"``). A ``Conflict`` (409:
cancelling a finished job, a v1 job that was cancelled) also says the job's status:
``{"error": "...", "status": "COMPLETED"}``.

Handlers raise typed errors from ``qwenserve.errors``; they never build error responses or pick
status codes themselves. Anything unexpected becomes a 500 with no stack trace for the client.

Routing's own refusals come here too, before any body is read: a 405 lists in ``Allow`` every
method the path is served for (Starlette's own lists only the first route it tried), and a
``POST /v1/<name>`` or ``/v2/<name>`` that no route serves is a 404 naming the models there are.
There is deliberately no ``POST /v1/{slug}`` catch-all route: it would match ``POST /v1/models``
before Starlette's 405 (Starlette takes the first route matching path and method), answering
"no model 'models'" for a path that is served, for GET.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from qwenserve.catalog import get_model
from qwenserve.errors import (
    Cancelled,
    Conflict,
    ContentPolicyViolation,
    FieldError,
    InvalidRequest,
    KeyQueueFull,
    QwenServeError,
    RateLimited,
    ServiceUnavailable,
    Unauthenticated,
    UnknownModel,
)

log = logging.getLogger("qwenserve.api")

OPENAI_PREFIX = "/v1/images/"
"""Routes under this prefix speak OpenAI's dialect (``api/openai_images.py``)."""

SLUG_PATH = re.compile(r"/v[12]/([^/]+)")
"""Where Segmind's run routes live (``POST /v1/{slug}``, ``POST /v2/{slug}``)."""

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class FieldErrorBody(BaseModel):
    """One bad field of a 400."""

    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer (the OpenAPI document's schema of each declared error status)."""

    error: str = Field(description="What went wrong, readable; on a 400 it names every bad field")
    errors: list[FieldErrorBody] | None = Field(
        None,
        description="400 only: each bad field and its problem (`body` for the body as a whole)",
    )
    status: str | None = Field(None, description="409 only: the job's status")


class OpenAIErrorDetail(BaseModel):
    """The ``error`` object of OpenAI's error answers."""

    message: str = Field(description="What went wrong, readable")
    type: str = Field(description="`invalid_request_error`, `authentication_error`, …")
    param: str | None = Field(description="The request field at fault, if one is")
    code: str | None = Field(description="`invalid_value`, `model_not_found`, …, if one applies")


class OpenAIErrorBody(BaseModel):
    """Every error answer of the OpenAI routes (``/v1/images/...``), as OpenAI's SDK reads it."""

    error: OpenAIErrorDetail


ERROR_MEANINGS: Mapping[int, str] = {
    400: "Invalid parameters: `error` names every bad field, `errors` lists them",
    401: "Missing or unknown API key (send `x-api-key`)",
    403: "The key may not use this model",
    404: "Not found",
    406: "The key's credits cannot pay for this run",
    409: "The request conflicts with the job's state (`status` says it)",
    413: "The request body is larger than the server takes",
    422: "The content policy blocked the request (`content_policy`)",
    429: "Too many requests this minute, or the key's queued jobs at its limit (see `Retry-After`)",
    500: "The engine failed while running the job",
    502: "A fetch failed upstream (an input URL the caller named is a 400 instead)",
    503: "Shutting down, no worker can take the job, the queue is full, or the store is "
    "failing over or could not replicate the submit (see `Retry-After`)",
    504: "No answer in time (an input URL, or the sync wait; the job goes on)",
}


def error_responses(
    *statuses: int, meanings: Mapping[int, str] | None = None, openai: bool = False
) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route for the error statuses it really answers, each with the
    ``{"error": ...}`` schema (with ``openai``, OpenAI's ``{"error": {"message", …}}``: the
    routes under ``OPENAI_PREFIX``); ``meanings`` words a status for this route."""
    words = {**ERROR_MEANINGS, **(meanings or {})}
    model = OpenAIErrorBody if openai else ErrorBody
    return {status: {"model": model, "description": words[status]} for status in statuses}


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    406: "insufficient_quota",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}


def is_openai(request: Request) -> bool:
    return is_openai_path(request.url.path)


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def openai_body(status: int, message: str, error: QwenServeError | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI's SDK reads it."""
    code: str | None = None
    if isinstance(error, UnknownModel):
        code = "model_not_found"
    elif isinstance(error, Unauthenticated):
        code = "invalid_api_key"
    elif isinstance(error, Cancelled):
        code = "cancelled"
    elif isinstance(error, ContentPolicyViolation):
        code = "content_policy_violation"
    elif status == 406:
        code = "insufficient_quota"
    elif status == 429:
        code = "rate_limit_exceeded"
    elif status == 400:
        code = "invalid_value"
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = safe_text(error.field) if error is not None and error.field is not None else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    error: QwenServeError, headers: dict[str, str] | None = None, *, openai: bool = False
) -> JSONResponse:
    """The response for a typed error (also used for a FAILED job's stored error in v1)."""
    all_headers = dict(headers or {})
    if isinstance(error, RateLimited):
        all_headers.update(rate_limit_headers(error))
    if isinstance(error, KeyQueueFull):
        all_headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    if isinstance(error, ServiceUnavailable) and error.retry_after_s is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    body: dict[str, Any] = {"error": safe_text(error.message)}
    if openai:
        body = openai_body(error.http_status, safe_text(error.message), error)
    elif isinstance(error, InvalidRequest):
        body["errors"] = [
            {"field": safe_text(e.field), "message": safe_text(e.message)} for e in error.errors
        ]
    elif isinstance(error, Conflict):
        body["status"] = error.job_status
    return JSONResponse(body, status_code=error.http_status, headers=all_headers)


def safe_text(text: str) -> str:
    """``text`` as UTF-8 can carry it: messages echo what a client sent, and JSON lets a client
    send lone UTF-16 surrogates, which would make the answer itself fail to encode (a 500)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def rate_limit_headers(error: RateLimited) -> dict[str, str]:
    """Retry-After plus the headers Segmind's clients read on a 429."""
    return {
        "Retry-After": str(max(1, math.ceil(error.retry_after_s))),
        "x-rate-limit-remaining": "0",
        "x-rate-limit-limit": str(error.limit),
        "x-rate-limit-reset-at-utc": datetime.fromtimestamp(error.reset_at, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
    }


def served_methods(request: Request) -> list[str]:
    """The methods some route of the app serves ``request``'s path for (each top-level route's
    ``matches`` descends into its included routers)."""
    served = []
    for method in HTTP_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            served.append(method)
    return served


def unknown_slug(request: Request) -> QwenServeError | None:
    """For a ``POST /v1/<name>`` or ``/v2/<name>`` no route serves: ``UnknownModel`` naming the
    models there are (each served slug has its own route, so ``name`` is none of them)."""
    found = SLUG_PATH.fullmatch(request.url.path)
    if request.method != "POST" or found is None or is_openai(request):
        return None
    try:
        get_model(found.group(1))
    except UnknownModel as error:
        return error
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping on ``app``."""

    async def on_qwenserve_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, QwenServeError)
        if error.http_status >= 500:
            log.warning("%s: %s", type(error).__name__, error.message)
        return error_response(error, openai=is_openai(request))

    def plain(request: Request, message: str, status: int, **kw: Any) -> JSONResponse:
        body = openai_body(status, message) if is_openai(request) else {"error": message}
        return JSONResponse(body, status_code=status, **kw)

    async def on_http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        detail: Any = error.detail
        message = detail if isinstance(detail, str) else "request failed"
        headers = dict(error.headers or {})
        if error.status_code == 404:
            message = "not found"
            unknown = unknown_slug(request)
            if unknown is not None:
                return error_response(unknown)
        elif error.status_code == 405:
            message = "method not allowed"
            headers["Allow"] = ", ".join(served_methods(request))
        return plain(request, message, error.status_code, headers=headers)

    async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems = []
        for problem in error.errors():
            where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body") or "request"
            problems.append(FieldError(where, f"{where}: {problem.get('msg', 'invalid')}"))
        invalid = InvalidRequest.from_errors(problems) if problems else InvalidRequest("invalid")
        return error_response(invalid, openai=is_openai(request))

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=error)
        return plain(request, "internal server error", 500)

    app.add_exception_handler(QwenServeError, on_qwenserve_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
