"""Query strings: every query parameter of this API takes one value.

``?until=a&until=b`` would otherwise be read as its last value, silently: a client that sent two
means something the server cannot know. One ASGI middleware answers 400 naming each repeated
parameter, in the path's dialect, before routing, so no handler counts values itself. (A FastAPI
app-wide dependency would do the same at ~300 Python calls on every request, query or not;
this costs one lookup when there is no query string.)
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from qwenserve.api.errors import error_response, is_openai_path
from qwenserve.errors import FieldError, InvalidRequest


class SingleValuedQuery:
    """ASGI middleware: a request that repeats a query parameter gets a 400 naming it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query: bytes = scope.get("query_string", b"") if scope["type"] == "http" else b""
        repeated = repeated_parameters(query) if query else []
        if not repeated:
            await self.app(scope, receive, send)
            return
        errors = [FieldError(name, f"{name}: give it once, not repeated") for name in repeated]
        error = InvalidRequest("; ".join(e.message for e in errors), errors=errors)
        await error_response(error, openai=is_openai_path(scope["path"]))(scope, receive, send)


def repeated_parameters(query: bytes) -> list[str]:
    """The names given more than once in ``query``, in order of their first repeat."""
    seen: set[str] = set()
    repeated: list[str] = []
    for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    return repeated
