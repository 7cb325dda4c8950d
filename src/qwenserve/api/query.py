"""Query strings: every query parameter of this API takes one value.

``?until=a&until=b`` would otherwise be read as its last value, silently: a client that sent two
means something the server cannot know. One check for every route (an app-wide dependency)
answers 400 naming the parameter instead, so no handler has to count values itself.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request

from qwenserve.errors import FieldError, InvalidRequest


def refuse_repeated_query_parameters(request: Request) -> None:
    """FastAPI dependency: 400 naming each query parameter given more than once."""
    query: bytes = request.scope.get("query_string", b"")
    if not query:
        return
    seen: set[str] = set()
    repeated: list[str] = []
    for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    if repeated:
        errors = [FieldError(name, f"{name}: give it once, not repeated") for name in repeated]
        raise InvalidRequest("; ".join(e.message for e in errors), errors=errors)
