"""The playground at ``/``: one HTML page, a few vanilla JS modules and a stylesheet, all served
from this package (``api/static/``; no CDN, no front-end build), so it works offline and ships
with the wheel. The page is only a client of the public API: it lists ``GET /v1/models``,
builds a form from each slug's ``input_schema``, submits through ``POST /v2/{slug}`` with the key
the user typed, follows the job's events and shows the result with its cost, the key's balance
(``GET /v1/get-user-credits``) and its recent requests (``GET /v2/requests``), and writes the form
as curl / segmind SDK / openai SDK code.

``GET /v1/server-info`` tells the page what it cannot learn elsewhere: the version and the kind of
weights (so it can say that the tiny preset's images are noise). It holds no secret: a weights
folder is reported as ``"folder"``, never its path.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from qwenserve import __version__
from qwenserve.api.schemas import ServerInfoBody
from qwenserve.api.services import Services
from qwenserve.errors import NotFound

router = APIRouter(tags=["playground"])

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PATH = "/playground"
# The only files served, with their types: a closed list, so no path reaches outside the folder.
ASSETS: dict[str, str] = {
    "playground.js": "text/javascript",
    "api.js": "text/javascript",
    "form.js": "text/javascript",
    "follow.js": "text/javascript",
    "account.js": "text/javascript",
    "codebox.js": "text/javascript",
    "snippets.js": "text/javascript",
    "playground.css": "text/css",
}
# The page needs nothing from elsewhere: scripts, styles and API calls are same-origin; images may
# be served from PUBLIC_URL's host, or come back inline (base64) as data: URIs.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob: http: https:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}
RANDOM_WEIGHTS = ("tiny", "random-full")


@router.get("/", include_in_schema=False)
async def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get(ASSETS_PATH + "/{name}", include_in_schema=False)
async def playground_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound("not found")
    # no-cache: revalidated (ETag) on each load, so an upgraded server never runs an old script.
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=headers)


def weights_kind(weights: str) -> str:
    """``tiny``, ``hub``, ``random-full`` or ``folder`` (a path is not shown to callers)."""
    return weights if weights in ("tiny", "hub", "random-full") else "folder"


@router.get(
    "/v1/server-info",
    summary="This server's version and kind of weights (no secrets)",
    response_model=ServerInfoBody,
)
async def server_info(request: Request) -> JSONResponse:
    services: Services = request.app.state.services
    kind = weights_kind(services.settings.weights)
    return JSONResponse(
        {
            "name": "qwenserve",
            "version": __version__,
            "weights": kind,
            "random_weights": kind in RANDOM_WEIGHTS,
        }
    )
