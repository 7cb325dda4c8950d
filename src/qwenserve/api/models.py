"""The model catalog over HTTP, in OpenAI's list shape: what a client or a UI can run here.

``GET /v1/models`` lists every slug (``id``, ``kind``, ``price_usd``, …); ``GET
/v1/models/{slug}`` adds its request body's JSON Schema (``input_schema``), so a form can be
built without reading the Segmind pages. Both are generated from the catalog and need no key
(what the server offers is no secret; running a model is).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from qwenserve.api.errors import error_responses
from qwenserve.api.schemas import ModelCard, ModelList
from qwenserve.api.services import Services
from qwenserve.catalog import ALL_MODELS, get_model, model_card, model_entry

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    summary="The models served here (OpenAI's list shape)",
    response_model=ModelList,
)
async def list_models(request: Request) -> JSONResponse:
    settings = request.app.state.services.settings
    data = [model_entry(spec, settings.price_for(spec.slug, spec.price_usd)) for spec in ALL_MODELS]
    return JSONResponse({"object": "list", "data": data})


@router.get(
    "/v1/models/{slug}",
    summary="One model: its kind, price and request body (a JSON Schema)",
    response_model=ModelCard,
    responses=error_responses(404, meanings={404: "No such model"}),
)
async def get_model_card(slug: str, request: Request) -> JSONResponse:
    services: Services = request.app.state.services
    spec = get_model(slug)  # UnknownModel: 404 naming the models there are
    return JSONResponse(model_card(spec, services.settings.price_for(slug, spec.price_usd)))
