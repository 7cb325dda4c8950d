"""What ``/openapi.json`` and ``/docs`` show: one path per slug with its body's JSON Schema
(``catalog.input_schema``, the same one ``GET /v1/models/{slug}`` answers), the key's security
schemes (declared in ``api/auth.py``), and Swagger UI served from local files, so the page works
with no network (the assets come from the ``fastapi-offline`` package; Swagger UI's online
validator is off). ReDoc's script is served from that package too, with the one external URL it
fetches (Redocly's logo in its menu, from a CDN) replaced by an inline image
(``REDOC_JS_PATH``).

Handlers read their bodies themselves (``api/jobs.read_json_body``, then the catalog's
validation), so no pydantic model declares the body: each slug's operation is marked
(``x-qwenserve-slug``) and its body schema set into the finished document as the catalog writes
it (FastAPI's own document model would turn an integer bound such as 2**63-1 into a float).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline

from qwenserve.api.auth import CurrentKey
from qwenserve.api.jobs import START_TIMEOUT_HEADER
from qwenserve.catalog import ALL_MODELS, ModelSpec, get_model, input_schema
from qwenserve.store.base import ApiKey

DOCS_ASSETS_URL = "/docs-assets"
# validatorUrl null: Swagger UI would otherwise send the document's URL to validator.swagger.io.
SWAGGER_UI_PARAMETERS = {
    "persistAuthorization": True,
    "tryItOutEnabled": True,
    "validatorUrl": None,
}
REDOC_JS_PATH = "/redoc-assets/redoc.standalone.js"
REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
# A transparent 1x1 GIF: the menu's "API docs by Redocly" link keeps its text, fetches nothing.
INLINE_LOGO = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"

SLUG_MARKER = "x-qwenserve-slug"

START_TIMEOUT_PARAMETER: dict[str, Any] = {
    "name": START_TIMEOUT_HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "Seconds the job may wait for its compute to begin. Not started by then "
    "(a worker's look-ahead does not count), it ends FAILED with reason `start_timeout`, "
    "refunded (v1 and the OpenAI routes answer 503); a started job is never cut by it. Not "
    "a positive number: 400 naming the header.",
}
"""The ``X-Start-Timeout`` request header, declared on every submit route (v1, v2, OpenAI):
pass ``START_TIMEOUT_OPENAPI`` as a route's ``openapi_extra``."""
START_TIMEOUT_OPENAPI: dict[str, Any] = {"parameters": [START_TIMEOUT_PARAMETER]}

SlugHandler = Callable[[str, Request, ApiKey], Awaitable[Response]]


def create_documented_app(**kwargs: Any) -> FastAPI:
    """A FastAPI app whose ``/docs`` and ``/redoc`` load their assets from this server."""
    app = FastAPIOffline(
        static_url=DOCS_ASSETS_URL,
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        redoc_url=None,
        **kwargs,
    )
    install_openapi(app)
    _add_redoc(app)
    return app


@functools.cache
def redoc_script() -> bytes:
    """fastapi-offline's ReDoc bundle with its CDN logo URL replaced by an inline image."""
    bundle = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
    return bundle.read_bytes().replace(REDOC_CDN_LOGO.encode(), INLINE_LOGO.encode())


def _add_redoc(app: FastAPI) -> None:
    """``/redoc`` (fastapi-offline's page, with ``redoc_script``) and its script."""

    @app.get("/redoc", include_in_schema=False)
    async def redoc_page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{REDOC_JS_PATH}",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    @app.get(REDOC_JS_PATH, include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(
            redoc_script(),
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )


def slug_request_body(spec: ModelSpec) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a slug's submit routes: its catalog schema, as is."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": input_schema(spec)}},
        }
    }


def add_slug_routes(
    router: APIRouter,
    path: str,
    handler: SlugHandler,
    *,
    summary: str,
    responses: dict[int | str, dict[str, Any]],
    response_model: Any = None,
) -> None:
    """``POST path`` for each slug (``path`` holds ``{slug}``), each documented with its own
    body, so "Try it out" offers that slug's fields. ``summary`` may say ``{title}``;
    ``response_model`` documents the 200 body (``api/schemas.py``)."""
    for spec in ALL_MODELS:
        router.add_api_route(
            path.format(slug=spec.slug),
            _bound(handler, spec.slug),
            methods=["POST"],
            summary=summary.format(title=spec.title),
            description=spec.summary,
            operation_id=f"{handler.__name__}_{spec.slug.replace('-', '_')}",
            responses=responses,
            response_model=response_model,
            openapi_extra={SLUG_MARKER: spec.slug, **START_TIMEOUT_OPENAPI},
        )


def _bound(handler: SlugHandler, slug: str) -> Callable[..., Awaitable[Response]]:
    async def endpoint(request: Request, key: CurrentKey) -> Response:
        return await handler(slug, request, key)

    endpoint.__name__ = handler.__name__
    return endpoint


def install_openapi(app: FastAPI) -> None:
    """Generate the document once, then set each slug's body and drop FastAPI's automatic 422
    answers: this API answers a bad parameter with 400 (``api/errors.py``), and only the v2
    reads declare a 422 (FAILED)."""

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()  # cached by FastAPI as app.openapi_schema
            _set_slug_bodies(document)
            _drop_framework_422(document)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _set_slug_bodies(document: dict[str, Any]) -> None:
    for item in document.get("paths", {}).values():
        for operation in item.values():
            slug = operation.get(SLUG_MARKER)
            if slug is not None:
                operation.update(slug_request_body(get_model(slug)))


def _drop_framework_422(document: dict[str, Any]) -> None:
    marker = "#/components/schemas/HTTPValidationError"
    for item in document.get("paths", {}).values():
        for operation in item.values():
            answer = operation.get("responses", {}).get("422", {})
            schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") == marker:
                del operation["responses"]["422"]
    schemas = document.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
