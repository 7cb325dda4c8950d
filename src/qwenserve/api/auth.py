"""Who is calling: the API key from ``x-api-key`` or ``Authorization: Bearer``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from qwenserve.accounts.keys import authenticate
from qwenserve.api.services import Services
from qwenserve.store.base import ApiKey

# The two ways to send a key, declared so the OpenAPI document lists them as security schemes
# and /docs' "Authorize" sends them; neither refuses by itself (authenticate says 401).
API_KEY_HEADER = APIKeyHeader(
    name="x-api-key",
    scheme_name="ApiKey",
    description="Your API key (`qwenserve keys create`), as Segmind's clients send it.",
    auto_error=False,
)
BEARER = HTTPBearer(
    scheme_name="Bearer",
    description="The same key as `Authorization: Bearer <key>`.",
    auto_error=False,
)


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def current_key(
    request: Request,
    _api_key: Annotated[str | None, Security(API_KEY_HEADER)],
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> ApiKey:
    """FastAPI dependency: the authenticated key (401 when missing or unknown).

    The headers are read by ``presented_key`` (one reading for every caller); the two
    ``Security`` parameters only declare the schemes.
    """
    services: Services = request.app.state.services
    key: ApiKey = await services.call(authenticate, services.store, presented_key(request))
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]
