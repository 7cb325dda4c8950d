"""Bodies built to break the server (issue 13): each is a 4xx naming what is wrong, never a 500,
on every dialect that reads a JSON body. In-process over ASGI on a real SQLite store."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from qwenserve.api.body import MAX_BODY_BYTES
from tests.service.helpers import body_for
from tests.service.inprocess import Harness

JSON_ROUTES = ["/v1/qwen-image-fast", "/v2/qwen-image-edit-fast", "/v1/images/generations"]


def message(body: dict[str, object]) -> str:
    error = body["error"]
    return str(error["message"] if isinstance(error, dict) else error)


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
async def test_lone_surrogate_in_a_value_is_a_400_naming_the_field(
    api: Harness, route: str, field: str
) -> None:
    if field == "negative_prompt" and route != "/v1/images/generations":
        route = "/v2/qwen-image"  # the slugs that take a negative prompt
    body = b'{"prompt": "a cat", "steps": 8, "%s": "a \\ud800 b"}' % field.encode()
    if route == "/v1/images/generations":
        body = b'{"model": "qwen-image", "%s": "a \\ud800 b"}' % field.encode()
        if field == "prompt":
            body = b'{"prompt": "a \\ud800 b"}'
    response = await api.http.post(route, content=body, headers=api.headers())
    assert response.status_code == 400, response.text
    assert f"{field} is not valid text" in message(response.json())
    assert api.store.claim("w", slugs=None, lease_s=5, max_attempts=1, now=api.clock.now) == []


@pytest.mark.parametrize("route", JSON_ROUTES)
async def test_lone_surrogate_in_a_field_name_is_a_400_that_echoes_it_escaped(
    api: Harness, route: str
) -> None:
    body = b'{"prompt": "a cat", "steps": 8, "pr\\ud800mpt": 1}'
    response = await api.http.post(route, content=body, headers=api.headers())
    assert response.status_code == 400, response.text
    assert "unknown parameter 'pr\\ud800mpt'" in message(response.json())


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested more than"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested more than"),
        (b'{"prompt": "x", "seed": ' + b"1" * 5001 + b"}", "number literal longer"),
        (b'{"prompt": "x", "guidance": 1.' + b"5" * 5001 + b"}", "number literal longer"),
        (b'{"prompt": "x", "guidance": NaN}', "NaN is not a JSON value"),
    ],
    ids=["deep-100k", "deep-40", "huge-int", "huge-float", "nan"],
)
async def test_json_that_would_blow_up_the_decoder_is_a_400(
    api: Harness, route: str, body: bytes, needle: str
) -> None:
    response = await api.http.post(route, content=body, headers=api.headers())
    assert response.status_code == 400, response.text
    assert needle in message(response.json())


async def test_a_chunked_body_is_refused_while_it_streams_in(api: Harness) -> None:
    chunk = b" " * (1024 * 1024)
    sent = 0

    async def upload() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(256):
            sent += len(chunk)
            yield chunk

    response = await api.http.post("/v2/qwen-image-fast", content=upload(), headers=api.headers())
    assert response.status_code == 413, response.text
    assert f"larger than {MAX_BODY_BYTES} bytes" in response.json()["error"]
    assert sent <= MAX_BODY_BYTES + 2 * len(chunk), "stopped reading once past the limit"


@pytest.mark.parametrize("route", ["/v2/qwen-image-fast", "/v1/images/edits"])
async def test_a_declared_content_length_past_the_limit_is_refused_unread(
    api: Harness, route: str
) -> None:
    read = False

    async def upload() -> AsyncIterator[bytes]:
        nonlocal read
        read = True
        yield b"{}"

    headers = {**api.headers(), "content-length": str(MAX_BODY_BYTES + 1)}
    response = await api.http.post(route, content=upload(), headers=headers)
    assert response.status_code == 413, response.text
    assert "larger than" in message(response.json())
    assert not read


async def test_an_input_of_extreme_aspect_is_a_400_at_submit(api: Harness) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (10000, 10)).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    body = body_for("qwen-image-edit-fast", image=image)
    response = await api.http.post("/v2/qwen-image-edit-fast", json=body, headers=api.headers())
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == "image"
    assert "10000x10" in response.json()["error"]
