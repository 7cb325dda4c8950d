"""Every query parameter takes one value: a repeated one is a 400 naming it, in each dialect,
before anything is kept or charged (api/query.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qwenserve.store.sqlite import SqliteStore
from tests.service.inprocess import Harness, make_harness


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Harness]:
    store = SqliteStore(tmp_path / "qwenserve.db")
    async for harness in make_harness(store, tmp_path):
        yield harness
    store.close()


async def test_a_repeated_filter_names_every_repeated_parameter(api: Harness) -> None:
    response = await api.http.get(
        "/v2/requests?limit=1&limit=2&model=a&model=b&status=queued", headers=api.headers()
    )
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == ["limit", "model"]
    # The fuzzer's case: a value and an empty one, which "last wins" would have read as absent.
    response = await api.http.get("/v1/usage?until=%C3%92%15%C2%BB&until=", headers=api.headers())
    assert response.status_code == 400
    assert response.json()["errors"] == [
        {"field": "until", "message": "until: give it once, not repeated"}
    ]
    single = await api.http.get("/v2/requests?limit=1&status=queued", headers=api.headers())
    assert single.status_code == 200


async def test_a_repeated_webhook_is_refused_before_any_charge(api: Harness) -> None:
    before = await api.credits()
    response = await api.http.post(
        "/v2/qwen-image-fast?webhook=https://a.example/x&webhook=https://b.example/y",
        json={"prompt": "a lighthouse"},
        headers=api.headers(),
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "webhook"
    assert await api.credits() == before
    listed = await api.http.get("/v2/requests", headers=api.headers())
    assert listed.json()["data"] == []


async def test_the_openai_dialect_names_the_parameter_its_way(api: Harness) -> None:
    response = await api.http.post(
        "/v1/images/generations?n=1&n=2",
        json={"prompt": "a lighthouse", "model": "qwen-image-fast"},
        headers=api.headers(),
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n" and error["type"] == "invalid_request_error"
