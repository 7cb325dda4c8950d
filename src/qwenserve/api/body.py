"""Request bodies read within bounds: size counted while the bytes stream in, JSON decoded with
its nesting depth and number literals bounded.

Without these, a hostile body costs the server before any check can refuse it: a chunked upload
is buffered whole before its size is known, 100,000 nested brackets exhaust the decoder's
recursion, and a 5,000-digit integer trips Python's int-conversion guard. Each is a 4xx here
that says what is wrong, before anything else reads the body.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenserve.api.errors import error_response, is_openai_path
from qwenserve.errors import BodyTooLarge, InvalidRequest

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 32
"""Every body we take is a flat object; 32 levels leave room for any client's wrapping."""
MAX_NUMBER_CHARS = 100
"""Longer than any number a parameter takes (seeds are at most 20 digits)."""


def too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body is larger than {limit} bytes")


class BodyLimit:
    """ASGI middleware: a request whose body passes ``limit`` bytes is refused (413) as it
    streams in; a ``Content-Length`` past it is refused before a byte is read.

    The count is made in ``receive``, so every reader (JSON, multipart forms) is bounded alike;
    the error raised there reaches the app's error mapping like any other.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            response = error_response(too_large(self.limit), openai=is_openai_path(scope["path"]))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def parse_json(body: bytes) -> Any:
    """``body`` decoded as JSON, refusing (400) what would blow up the decoder or what reads it:
    nesting deeper than ``MAX_JSON_DEPTH``, number literals longer than ``MAX_NUMBER_CHARS``,
    and NaN/Infinity (not JSON)."""
    if not body.strip():
        raise InvalidRequest("request body is empty: send a JSON object with the parameters")
    try:
        value = json.loads(
            body,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
        )
    except RecursionError:
        raise _too_deep() from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"malformed JSON body: {error}") from None
    _check_depth(value)
    return value


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"JSON body is nested more than {MAX_JSON_DEPTH} levels deep")


def _number(text: str) -> str:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidRequest(
            f"JSON body holds a number literal longer than {MAX_NUMBER_CHARS} characters"
        )
    return text


def _parse_int(text: str) -> int:
    return int(_number(text))


def _parse_float(text: str) -> float:
    return float(_number(text))


def _refuse_constant(text: str) -> Any:
    raise InvalidRequest(f"malformed JSON body: {text} is not a JSON value")


def _check_depth(value: Any) -> None:
    """Iterative (a recursive walk is what the bound protects against)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        stack.extend((child, depth + 1) for child in children)
