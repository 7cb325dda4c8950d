"""What /docs, /redoc and /openapi.json promise a reader: pages that load nothing from another
host (they work offline, leak no visit), and a real schema for every success answer (Redoc
showed `null` samples for empty ones), which the answers really match. In-process over ASGI on
a real SQLite store; the test plays the worker through the store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.service.inprocess import Harness

EXTERNAL = re.compile(r"""(?:https?:)?//(?!127\.0\.0\.1|localhost)[a-z0-9.-]+\.[a-z]{2,}""", re.I)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_doc_pages_reference_no_external_host(api: Harness, page: str) -> None:
    response = await api.http.get(page)
    assert response.status_code == 200
    assert not EXTERNAL.search(response.text), f"{page} names another host"
    scripts = re.findall(r"""<script src=["']([^"']+)["']""", response.text)
    assert scripts, page
    for script in scripts:
        assert script.startswith("/"), script
        asset = await api.http.get(script)
        assert asset.status_code == 200 and asset.content, script
    if page == "/docs":  # Swagger UI would send the document's URL to validator.swagger.io
        assert '"validatorUrl": null' in response.text


async def test_redoc_logo_is_inline() -> None:
    """Redoc's menu logo came from cdn.redoc.ly: the served bundle has none of it."""
    from qwenserve.api.docs import INLINE_LOGO, REDOC_CDN_LOGO, redoc_script

    script = redoc_script().decode()
    assert REDOC_CDN_LOGO not in script and "cdn.redoc" not in script
    assert INLINE_LOGO in script, "the logo's image element is still there, inline"


def _media_schemas(document: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if status.startswith("2"):
                    content = answer.get("content") or {"(none)": {}}
                    for media_type, entry in content.items():
                        yield f"{method.upper()} {path} {status} {media_type}", status, entry


async def test_every_success_answer_has_a_schema(api: Harness) -> None:
    document = (await api.http.get("/openapi.json")).json()
    empty = [where for where, _, entry in _media_schemas(document) if not entry.get("schema")]
    assert not empty, f"2xx answers with no schema: {empty[:5]}"
    paths = document["paths"]
    v1 = paths["/v1/qwen-image-fast"]["post"]["responses"]["200"]["content"]
    assert v1["image/png"]["schema"] == {"type": "string", "format": "binary"}
    cancel = paths["/v2/requests/{request_id}/cancel"]["post"]["responses"]
    assert {"200", "202"} <= set(cancel)


def _validator(document: dict[str, Any], method: str, path: str, status: int) -> Any:
    answer = document["paths"][path][method]["responses"][str(status)]
    schema = answer["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": document["components"]})


async def test_answers_match_their_documented_schemas(api: Harness) -> None:
    """Real bodies of each documented JSON success answer validate against its schema."""
    document = (await api.http.get("/openapi.json")).json()
    http, headers = api.http, api.headers()
    checked: list[tuple[str, str, int, Any]] = []

    def check(method: str, path: str, status: int, body: Any) -> None:
        _validator(document, method, path, status).validate(body)
        checked.append((method, path, status, body))

    submit = await http.post(
        "/v2/qwen-image-fast", headers=headers, json={"prompt": "a fox", "steps": 8}
    )
    check("post", "/v2/qwen-image-fast", 200, submit.json())
    queued = submit.json()["request_id"]
    status = await api.status(queued)
    assert status.json()["queue_position"] == 0
    check("get", "/v2/requests/{request_id}/status", 200, status.json())
    job = api.claim()
    api.beat(job.id, 3)
    running = await http.get(f"/v2/requests/{queued}", headers=headers)
    assert running.json()["progress"]["step"] == 3
    check("get", "/v2/requests/{request_id}", 200, running.json())
    cancel = await http.post(f"/v2/requests/{queued}/cancel", headers=headers)
    assert cancel.status_code == 202
    check("post", "/v2/requests/{request_id}/cancel", 202, cancel.json())
    other = await api.submit()
    api.claim()
    api.complete(other)
    done = await http.get(f"/v2/requests/{other}", headers=headers)
    assert "/media/" in done.json()["output"]
    check("get", "/v2/requests/{request_id}", 200, done.json())
    for path in ("/v1/get-user-credits", "/v2/requests", "/v1/usage", "/v1/models"):
        answer = await http.get(path, headers=headers)
        check("get", path, 200, answer.json())
    check("get", "/v1/models/{slug}", 200, (await http.get("/v1/models/qwen-image")).json())
    check("get", "/healthz", 200, (await http.get("/healthz")).json())
    check("get", "/v1/server-info", 200, (await http.get("/v1/server-info")).json())
    # The schemas say something: a body of the wrong shape is refused.
    assert not _validator(document, "get", "/v2/requests", 200).is_valid({"data": None})
    assert not _validator(document, "post", "/v2/qwen-image-fast", 200).is_valid({})
    assert len(checked) == 12
