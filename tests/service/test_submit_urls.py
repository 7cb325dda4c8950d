"""Input URLs whose host is written as a private or loopback address are refused when the job is
submitted (400 naming the field, nothing charged or queued), on v2 as on v1; names are left to
the worker's fetch, which checks what they resolve to; ALLOW_PRIVATE_URLS lets them through."""

from __future__ import annotations

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
