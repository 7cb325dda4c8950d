"""The submit-time prompt length check counts only what could pass the limit: a prompt of at
most ``max_prompt_tokens`` bytes (after NFC) cannot, whatever the byte-level tokenizer, so the
tokenizer is not run (nor loaded) for it; a longer one is counted and refused past the limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qwenserve.catalog import Recipe, get_model
from qwenserve.store.sqlite import SqliteStore
from tests.service.helpers import body_for
from tests.service.inprocess import Harness, make_harness

EDIT = "qwen-image-edit-fast"
LIMIT = get_model(EDIT).recipe.max_prompt_tokens


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Harness]:
    store = SqliteStore(tmp_path / "qwenserve.db")
    try:
        async for harness in make_harness(store, tmp_path):
            yield harness
    finally:
        store.close()


class CharCounter:
    """One token per character (a stand-in tokenizer), remembering what it counted."""

    def __init__(self) -> None:
        self.counted: list[str] = []

    def __call__(self, recipe: Recipe, text: str) -> int:
        self.counted.append(text)
        return len(text)


async def test_a_short_prompt_is_not_tokenized(api: Harness) -> None:
    assert LIMIT is not None
    counter = CharCounter()
    api.services.prompt_tokens = counter
    await api.submit(EDIT, prompt="a" * LIMIT)
    await api.submit(EDIT, prompt="山" * (LIMIT // 3))
    assert counter.counted == [], "no prompt of at most LIMIT bytes can pass LIMIT tokens"


async def test_a_prompt_that_may_pass_the_limit_is_counted_and_refused(api: Harness) -> None:
    assert LIMIT is not None
    counter = CharCounter()
    api.services.prompt_tokens = counter
    before = await api.credits()
    body = body_for(EDIT, prompt="a" * (LIMIT + 1))
    response = await api.http.post(f"/v2/{EDIT}", json=body, headers=api.headers())
    assert response.status_code == 400, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["prompt"]
    assert f"{LIMIT + 1} tokens long" in response.text
    assert await api.credits() == before
    await api.submit(EDIT, prompt="山" * (LIMIT // 2))  # more bytes than LIMIT: counted, fits
    assert len(counter.counted) == 2
