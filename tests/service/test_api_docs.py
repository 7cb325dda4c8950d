"""Every door a user knocks on: the model catalog (/v1/models), the OpenAPI document and /docs
(per-slug bodies, the key's security scheme, assets served locally), and a 400 that lists every
bad field. In-process over ASGI on a real SQLite store."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from qwenserve.catalog import ALL_MODELS, MODELS, input_schema
from qwenserve.store.base import Store
from tests.service.inprocess import Harness, make_harness, open_test_store

SLUGS = [m.slug for m in ALL_MODELS]


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store("sqlite", tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path, prices_usd={"qwen-image": 0.5}):
        yield harness


async def test_models_list_in_openai_shape(api: Harness) -> None:
    response = await api.http.get("/v1/models")  # no key needed
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == SLUGS
    for entry in body["data"]:
        assert entry["object"] == "model" and entry["owned_by"] == "qwenserve"
        assert isinstance(entry["created"], int) and entry["created"] > 0
        expected = "edit" if "edit" in entry["id"] else "text-to-image"
        if entry["id"].startswith("qwen-image-2.1"):
            expected = "text-to-image+edit"  # references optional: both in one model
        assert entry["kind"] == expected
        assert "input_schema" not in entry
    prices = {m["id"]: m["price_usd"] for m in body["data"]}
    assert prices["qwen-image"] == 0.5, "the price this server charges (Settings override)"
    assert prices["qwen-image-fast"] == MODELS["qwen-image-fast"].price_usd


async def test_model_card_carries_its_input_schema(api: Harness) -> None:
    response = await api.http.get("/v1/models/qwen-image-edit-fast")
    assert response.status_code == 200
    card = response.json()
    assert card["id"] == "qwen-image-edit-fast" and card["kind"] == "edit"
    assert card["input_schema"] == input_schema(MODELS["qwen-image-edit-fast"])
    image = card["input_schema"]["properties"]["image"]
    assert image["x-qwenserve-image"] is True and image["contentMediaType"] == "image/*"
    missing = await api.http.get("/v1/models/qwen-image-turbo")
    assert missing.status_code == 404
    assert "qwen-image-fast" in missing.json()["error"], "names the models there are"


async def test_models_routes_leave_the_segmind_routes_alone(api: Harness) -> None:
    credits = await api.http.get("/v1/get-user-credits", headers=api.headers())
    assert credits.status_code == 200 and credits.json()["credits"] == 10.0
    # POST /v1/models is not Segmind's sync route with slug "models": the path is served, for GET.
    # GET /v2/requests is the key's history.
    for path in ("/v1/models", "/v1/get-user-credits", "/v1/server-info", "/v2/requests"):
        response = await api.http.post(path, headers=api.headers(), json={"prompt": "x"})
        assert response.status_code == 405 and response.headers["allow"] == "GET", path
    for path in ("/v1/qwen-image-turbo", "/v2/qwen-image-turbo"):
        response = await api.http.post(path, headers=api.headers(), json={"prompt": "x"})
        assert response.status_code == 404 and "available models" in response.json()["error"]
    # Allow lists every method the path is served for, not only the first route's.
    options = await api.http.options("/v2/requests/abc", headers=api.headers())
    assert options.status_code == 405 and options.headers["allow"] == "GET, DELETE"
    submitted = await api.http.post(
        "/v2/qwen-image-fast", headers=api.headers(), json={"prompt": "a fox", "steps": 8}
    )
    assert submitted.status_code == 200 and submitted.json()["status"] == "QUEUED"


async def test_openapi_documents_each_slug_body_and_the_key(api: Harness) -> None:
    document = (await api.http.get("/openapi.json")).json()
    paths = document["paths"]
    for spec in ALL_MODELS:
        for path in (f"/v1/{spec.slug}", f"/v2/{spec.slug}"):
            operation = paths[path]["post"]
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert schema == input_schema(spec), path
            assert {"ApiKey": []} in operation["security"], path
            assert {"400", "401", "403", "406", "429"} <= set(operation["responses"]), path
            error = operation["responses"]["400"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert "/v1/{slug}" not in paths and "/v2/{slug}" not in paths
    scheme = document["components"]["securitySchemes"]["ApiKey"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "x-api-key"}
    assert "security" not in paths["/v1/models"]["get"], "the catalog needs no key"
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    status = paths["/v2/requests/{request_id}/status"]["get"]["responses"]
    assert {"401", "404", "422"} <= set(status)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for item in paths.values():
        for operation in item.values():
            bad = operation["responses"].get("422", {}).get("content", {})
            assert "HTTPValidationError" not in str(bad)


async def test_docs_page_loads_only_local_assets(api: Harness) -> None:
    page = await api.http.get("/docs")
    assert page.status_code == 200
    html = page.text
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""url:\s*["']([^"']+)["']""", html)
    assert any(u.endswith(".js") for u in urls) and any(u.endswith(".css") for u in urls)
    assert "/openapi.json" in urls
    assert not re.search(r"https?://|//cdn", html), "no CDN: /docs works offline"
    for url in urls:
        asset = await api.http.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url


async def test_400_lists_every_bad_field(api: Harness) -> None:
    body: dict[str, Any] = {"prompt": "", "steps": 99, "aspect_ratio": "5:4", "seeed": 1}
    for path in ("/v1/qwen-image-fast", "/v2/qwen-image-fast"):
        response = await api.http.post(path, headers=api.headers(), json=body)
        assert response.status_code == 400
        answer = response.json()
        fields = [e["field"] for e in answer["errors"]]
        assert fields == ["seeed", "prompt", "steps", "aspect_ratio"]
        for problem in answer["errors"]:
            assert problem["message"] in answer["error"]
        assert "between 1 and 16" in answer["error"]
    one = await api.http.post(
        "/v2/qwen-image-fast", headers=api.headers(), json={"prompt": "x", "steps": 17}
    )
    assert one.json() == {
        "error": "steps must be between 1 and 16, got 17",
        "errors": [{"field": "steps", "message": "steps must be between 1 and 16, got 17"}],
    }
    malformed = await api.http.post(
        "/v2/qwen-image-fast",
        headers={**api.headers(), "content-type": "application/json"},
        content=b"{",
    )
    assert malformed.status_code == 400
    assert [e["field"] for e in malformed.json()["errors"]] == ["body"], "never an empty list"


async def test_schema_accepted_bodies_are_queued(api: Harness) -> None:
    """What the published schema accepts, the API takes (a default body per slug)."""
    for spec in ALL_MODELS:
        schema = input_schema(spec)
        body = {
            name: prop["default"]
            for name, prop in schema["properties"].items()
            if prop.get("default") is not None
        }
        body["prompt"] = "a red fox"
        if spec.image_fields:
            body[spec.image_fields[0]] = "https://example.com/in.png"
        assert Draft202012Validator(schema).is_valid(body), spec.slug
        response = await api.http.post(f"/v2/{spec.slug}", headers=api.headers(), json=body)
        assert response.status_code == 200, (spec.slug, response.text)
