"""Who is calling: the API key from ``x-api-key`` or ``Authorization: Bearer``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from qwenserve.accounts.keys import authenticate
from qwenserve.api.services import Services
from qwenserve.store.base import ApiKey


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def current_key(request: Request) -> ApiKey:
    """FastAPI dependency: the authenticated key (401 when missing or unknown)."""
    services: Services = request.app.state.services
    key: ApiKey = await services.call(authenticate, services.store, presented_key(request))
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]
