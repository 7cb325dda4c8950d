"""Input URLs whose host is written as a private or loopback address are refused when the job is
submitted (400 naming the field, nothing charged or queued), on v2 as on v1; names are left to
the worker's fetch, which checks what they resolve to; ALLOW_PRIVATE_URLS lets them through."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qwenserve.store.base import Store
from tests.service.helpers import body_for
from tests.service.inprocess import Harness, make_harness, open_test_store

EDIT = "qwen-image-edit-fast"
LORA_SLUG = "qwen-image-edit-plus-product-photography"


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store("sqlite", tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path):
        yield harness


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/in.png",
        "http://localhost/in.png",
        "https://[::1]/in.png",
        "http://10.1.2.3/in.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:192.168.0.1]/in.png",
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_private_literal_host_is_refused_at_submit(
    api: Harness, url: str, version: str
) -> None:
    before = await api.credits()
    response = await api.http.post(
        f"/{version}/{EDIT}", json=body_for(EDIT, image=url), headers=api.headers()
    )
    assert response.status_code == 400, response.text
    assert "image" in response.text and "private, loopback or reserved" in response.text
    assert await api.credits() == before
    assert api.store.stats(now=api.clock.now).waiting_for_engine() == {}


async def test_a_private_lora_url_is_refused_at_submit(api: Harness) -> None:
    body = body_for(LORA_SLUG, lora_2_url="http://127.0.0.1/style.safetensors")
    response = await api.http.post(f"/v2/{LORA_SLUG}", json=body, headers=api.headers())
    assert response.status_code == 400, response.text
    assert "lora_2_url" in response.text and "private, loopback or reserved" in response.text


async def test_host_names_wait_for_the_fetch(api: Harness) -> None:
    # No DNS at submit: a name is judged by the addresses it resolves to when it is fetched.
    await api.submit(EDIT, image="https://images.example.com/in.png")


async def test_allow_private_urls_lets_them_through(store: Store, tmp_path: Path) -> None:
    async for api in make_harness(store, tmp_path, allow_private_urls=True):
        await api.submit(EDIT, image="http://127.0.0.1:8080/in.png")


HTML = base64.b64encode(b"<!DOCTYPE html><html><body>Sign in</body></html>").decode()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_every_stage_names_its_fields_in_one_400(api: Harness, version: str) -> None:
    """A web page sent as the image (found by decoding) and no prompt (found by the contract)
    are both named: the client fixes both in one round trip."""
    before = await api.credits()
    response = await api.http.post(
        f"/{version}/{EDIT}", json={"image": HTML}, headers=api.headers()
    )
    assert response.status_code == 400, response.text
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == ["image", "prompt"]
    assert errors[0]["message"].startswith("image: not an image (got text/html)")
    assert "prompt is required" in response.json()["error"]
    assert await api.credits() == before


async def test_a_private_url_and_a_bad_field_are_named_together(api: Harness) -> None:
    body = body_for(LORA_SLUG, lora_2_url="http://127.0.0.1/style.safetensors", quality=500)
    response = await api.http.post(f"/v2/{LORA_SLUG}", json=body, headers=api.headers())
    assert response.status_code == 400, response.text
    fields = [e["field"] for e in response.json()["errors"]]
    assert fields == ["lora_2_url", "quality"], "both, in the page's order"


@pytest.mark.parametrize(
    "body",
    [b'{"prompt": "x",', b"[1, 2]", b""],
    ids=["malformed", "not-an-object", "empty"],
)
async def test_a_400_always_lists_what_is_wrong(api: Harness, body: bytes) -> None:
    headers = {**api.headers(), "content-type": "application/json"}
    response = await api.http.post(f"/v1/{EDIT}", content=body, headers=headers)
    assert response.status_code == 400, response.text
    errors = response.json()["errors"]
    assert errors and errors[0]["field"] == "body"
    assert errors[0]["message"] == response.json()["error"]
