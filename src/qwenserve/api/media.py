"""Serving generated images by their unguessable media id until their result expires."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from qwenserve.api.errors import error_responses
from qwenserve.api.schemas import IMAGE_CONTENT
from qwenserve.api.services import Services
from qwenserve.errors import NotFound

router = APIRouter(tags=["media"])


@router.get(
    "/media/{media_id}",
    summary="A generated image (URL valid until the result expires)",
    response_class=Response,
    responses={
        200: {"description": "The image", "content": IMAGE_CONTENT},
        **error_responses(404, meanings={404: "Unknown or expired media id"}),
    },
)
async def get_media(media_id: str, request: Request) -> Response:
    services: Services = request.app.state.services
    stored = await services.call(services.media.get, media_id, now=services.clock())
    if stored is None:
        raise NotFound("media not found (unknown or expired)")
    data, content_type = stored
    return Response(
        content=data,
        media_type=content_type,
        headers={"Cache-Control": "private, max-age=3600"},
    )
