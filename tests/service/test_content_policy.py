"""The content policy's prompt check over the API, in-process on SQLite and on a real
redis-server: a blocked request is refused before any charge or compute, on v1 (422 at once),
v2 (a request id whose poll says FAILED, 422) and OpenAI's dialect (content_policy_violation);
counted on /metrics; logged by request id, never with the prompt unless configured."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qwenserve.policy import OUTPUT_BLOCKED, PROMPT_BLOCKED
from qwenserve.store.base import Store
from tests.service.helpers import body_for
from tests.service.inprocess import WORKER, Harness, make_harness, open_test_store
from tests.service.test_metrics import samples, value

TERM = "forbidden fruit"
VARIANTS = [
    "a still life with Forbidden Fruit",  # case
    "a still life with ｆｏｒｂｉｄｄｅｎ ｆｒｕｉｔ",  # full width
    "a still life with forb\u200bidden\u200d fruit",  # zero-width characters
]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
def terms(tmp_path: Path) -> Path:
    path = tmp_path / "blocked.txt"
    path.write_text(f"# house rules\n{TERM}\nre:\\bgore\\w*\n", encoding="utf-8")
    return path


@pytest.fixture
async def api(store: Store, tmp_path: Path, terms: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(
        store, tmp_path, content_policy="prompt", blocked_terms_file=terms, sync_timeout_s=5
    ):
        yield harness


def assert_blocked_body(body: dict[str, object]) -> None:
    assert body["error"] == PROMPT_BLOCKED
    assert "fruit" not in str(body).lower(), "the matched term is never echoed"


@pytest.mark.parametrize("prompt", VARIANTS)
async def test_v2_blocked_prompt_is_failed_with_no_charge_or_queue(
    api: Harness, prompt: str
) -> None:
    before = await api.credits()
    submit = await api.http.post(
        "/v2/qwen-image-fast",
        json=body_for("qwen-image-fast", prompt=prompt),
        headers=api.headers(),
    )
    assert submit.status_code == 200, submit.text
    assert submit.json()["status"] == "FAILED"
    request_id = submit.json()["request_id"]
    status = await api.status(request_id)
    assert status.status_code == 422
    assert status.json()["status"] == "FAILED"
    assert_blocked_body(status.json())
    result = await api.http.get(f"/v2/requests/{request_id}", headers=api.headers())
    assert result.status_code == 422 and result.json()["output"] is None
    assert await api.credits() == pytest.approx(before)
    assert api.store.claim("w", slugs=None, lease_s=30, max_attempts=3, now=api.clock.now) == []
    stored = api.store.get_job(request_id, now=api.clock.now)
    assert stored is not None and stored.error_kind == "content_policy" and stored.cost_usd == 0


@pytest.mark.parametrize("prompt", VARIANTS)
async def test_v1_blocked_prompt_is_422_at_once_with_no_charge(api: Harness, prompt: str) -> None:
    before = await api.credits()
    response = await api.http.post(
        "/v1/qwen-image-fast",
        json=body_for("qwen-image-fast", prompt=prompt),
        headers=api.headers(),
    )
    assert response.status_code == 422
    assert set(response.json()) == {"error"}
    assert_blocked_body(response.json())
    assert float(response.headers["x-remaining-credits"]) == pytest.approx(before)
    assert await api.credits() == pytest.approx(before)


async def test_negative_prompt_and_regex_terms_are_checked_too(api: Harness) -> None:
    for body in (
        body_for("qwen-image", negative_prompt="FORBIDDEN   FRUIT, blurry"),
        body_for("qwen-image", prompt="a GOREFEST battle scene"),
    ):
        response = await api.http.post("/v1/qwen-image", json=body, headers=api.headers())
        assert response.status_code == 422, body
        assert_blocked_body(response.json())


async def test_a_blocked_edit_keeps_no_inline_image(api: Harness) -> None:
    body = body_for("qwen-image-edit-fast", prompt=VARIANTS[0])
    response = await api.http.post("/v2/qwen-image-edit-fast", json=body, headers=api.headers())
    request_id = response.json()["request_id"]
    stored = api.store.get_job(request_id, now=api.clock.now)
    assert stored is not None and stored.request.images == ()
    assert not any(p.is_file() for p in api.media.root.rglob("*")), "nothing in the media store"


async def test_allowed_prompts_are_queued_and_charged(api: Harness) -> None:
    before = await api.credits()
    request_id = await api.submit(prompt="fruit in a forbidden city, gorgeous light")
    assert (await api.status(request_id)).json()["status"] == "QUEUED"
    assert await api.credits() < before


async def test_openai_dialect_says_content_policy_violation(api: Harness) -> None:
    body = {"model": "qwen-image-fast", "prompt": VARIANTS[1], "steps": 2}
    response = await api.http.post("/v1/images/generations", json=body, headers=api.headers())
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "content_policy_violation"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == PROMPT_BLOCKED


async def test_blocks_are_counted_on_metrics_and_logged_without_the_prompt(
    api: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="qwenserve"):
        for prompt in VARIANTS[:2]:
            await api.http.post(
                "/v1/qwen-image-fast",
                json=body_for("qwen-image-fast", prompt=prompt),
                headers=api.headers(),
            )
    blocked = [r for r in caplog.records if "blocked by the content policy" in r.getMessage()]
    assert len(blocked) == 2
    assert all("fruit" not in r.getMessage().lower() for r in caplog.records)
    page = samples((await api.http.get("/metrics")).text)
    assert value(page, "qwenserve_content_policy_blocks_total", kind="prompt") == 2
    assert value(page, "qwenserve_content_policy_blocks_total", kind="output") == 0
    assert value(page, "qwenserve_job_failures_total", kind="content_policy") == 2


async def test_an_output_a_worker_blocked_reads_failed_refunded_and_is_counted(
    api: Harness,
) -> None:
    """What the worker's finisher does with a flagged image (tests/service/
    test_content_policy_worker.py), seen through the API on either store."""
    before = await api.credits()
    request_id = await api.submit()
    job = api.claim()
    ended = api.store.fail(
        job.id, WORKER, kind="content_policy", message=OUTPUT_BLOCKED, now=api.clock.now
    )
    assert ended
    status = await api.status(request_id)
    assert status.status_code == 422
    assert (status.json()["status"], status.json()["error"]) == ("FAILED", OUTPUT_BLOCKED)
    result = await api.http.get(f"/v2/requests/{request_id}", headers=api.headers())
    assert result.status_code == 422 and result.json()["output"] is None
    assert await api.credits() == pytest.approx(before)
    page = samples((await api.http.get("/metrics")).text)
    assert value(page, "qwenserve_content_policy_blocks_total", kind="output") == 1
    assert value(page, "qwenserve_content_policy_blocks_total", kind="prompt") == 0


async def test_blocked_prompts_are_logged_when_configured(
    store: Store, tmp_path: Path, terms: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async for api in make_harness(
        store,
        tmp_path,
        content_policy="prompt",
        blocked_terms_file=terms,
        log_blocked_prompts=True,
        sync_timeout_s=5,
    ):
        with caplog.at_level(logging.INFO, logger="qwenserve"):
            response = await api.http.post(
                "/v1/qwen-image-fast",
                json=body_for("qwen-image-fast", prompt=VARIANTS[0]),
                headers=api.headers(),
            )
        assert response.status_code == 422
        assert any(VARIANTS[0] in r.getMessage() for r in caplog.records)


async def test_off_by_default(store: Store, tmp_path: Path) -> None:
    async for api in make_harness(store, tmp_path):
        request_id = await api.submit(prompt=VARIANTS[0])
        assert (await api.status(request_id)).json()["status"] == "QUEUED"
