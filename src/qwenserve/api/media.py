"""Serving generated images by their unguessable media id until their result expires.

With ``QWENSERVE_MEDIA_URLS=proxy`` (the default) the API reads the bytes from the media store
and sends them. With ``presigned`` (media in S3) it checks the object is there and unexpired,
then redirects to a presigned bucket URL that expires with the result, so image bytes never
pass through the API. The id is the only credential either way, as it always was.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from qwenserve.api.errors import error_responses
from qwenserve.api.schemas import IMAGE_CONTENT
from qwenserve.api.services import Services
from qwenserve.errors import NotFound
from qwenserve.media.storage import PresigningMediaStore

router = APIRouter(tags=["media"])

MISSING = "media not found: unknown, expired, or no longer in the media store"


@router.get(
    "/media/{media_id}",
    summary="A generated image (URL valid until the result expires)",
    response_class=Response,
    responses={
        200: {"description": "The image", "content": IMAGE_CONTENT},
        307: {
            "description": "With QWENSERVE_MEDIA_URLS=presigned: a redirect (Location) to a "
            "presigned object storage URL that expires with the result"
        },
        **error_responses(
            404,
            503,
            meanings={
                404: "Unknown or expired media id, or its object is gone from the media store",
                503: "The media store (S3 bucket) is unreachable for now",
            },
        ),
    },
)
async def get_media(media_id: str, request: Request) -> Response:
    services: Services = request.app.state.services
    media = services.media
    if services.settings.media_urls == "presigned" and isinstance(media, PresigningMediaStore):
        url = await services.call(media.presigned_url, media_id, now=services.clock())
        if url is None:
            raise NotFound(MISSING)
        # Not cached: the presigned URL carries its own expiry; a fresh one is cheap.
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    stored = await services.call(media.get, media_id, now=services.clock())
    if stored is None:
        raise NotFound(MISSING)
    data, content_type = stored
    return Response(
        content=data,
        media_type=content_type,
        headers={"Cache-Control": "private, max-age=3600"},
    )
