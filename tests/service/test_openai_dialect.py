"""The OpenAI images dialect in-process (ASGI, a real SQLite store; the test plays the worker):
what each `response_format` answers, every answer within the `openai` SDK's own types,
`Idempotency-Key` on /v1/images/* (one set of jobs, one charge, 409 on another body), and
typo hints among the dialect's own fields."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest
from openai.types import ImagesResponse
from openai.types.image_edit_completed_event import ImageEditCompletedEvent
from openai.types.image_gen_completed_event import ImageGenCompletedEvent

from qwenserve.catalog import MODELS
from tests.service.helpers import png_b64
from tests.service.inprocess import (
    LEASE_S,
    WORKER,
    Harness,
    parse_sse,
)
from tests.service.openai_types import assert_conforms

SLUG = "qwen-image-fast"
PRICE = MODELS[SLUG].price_usd
FAKE_PNG = b"\x89PNG fake"  # what Harness.complete stores as each image


async def answered(api: Harness, call: Any) -> httpx.Response:
    """``call``'s answer, the test completing every job the server queues meanwhile."""
    task = asyncio.ensure_future(call)
    while not task.done():
        for job in api.store.claim(
            WORKER, slugs=None, lease_s=LEASE_S, max_attempts=3, now=api.clock.now, limit=10
        ):
            api.complete(job.id)
            api.services.hub.notify(job.id)
        await asyncio.sleep(0.01)
    return await task


def generate(api: Harness, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return api.http.post(
        "/v1/images/generations",
        json={"model": SLUG, "prompt": "a red fox", **body},
        headers={**api.headers(), **(headers or {})},
    )


def edit(api: Harness, headers: dict[str, str] | None = None, **fields: Any) -> Any:
    image = base64.b64decode(png_b64())
    return api.http.post(
        "/v1/images/edits",
        data={"model": "qwen-image-edit-fast", "prompt": "make it blue", **fields},
        files=[("image", ("in.png", image, "image/png"))],
        headers={**api.headers(), **(headers or {})},
    )


# --- response_format ----------------------------------------------------------------------


async def test_no_response_format_answers_both_url_and_b64_json(api: Harness) -> None:
    response = await answered(api, generate(api, n=2))
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 2
    for item in body["data"]:
        assert base64.b64decode(item["b64_json"]) == FAKE_PNG
        assert item["url"].startswith("http://api.test/media/")
        fetched = await api.http.get(item["url"])
        assert fetched.status_code == 200 and fetched.content == FAKE_PNG
    assert_conforms(ImagesResponse, body)


@pytest.mark.parametrize("wanted", ["url", "b64_json"])
async def test_an_explicit_response_format_answers_only_that(api: Harness, wanted: str) -> None:
    response = await answered(api, generate(api, response_format=wanted))
    assert response.status_code == 200, response.text
    body = response.json()
    (item,) = body["data"]
    assert wanted in item and ({"url", "b64_json"} - {wanted}).isdisjoint(item)
    assert_conforms(ImagesResponse, body)


async def test_edit_answers_conform_to_the_sdk_types(api: Harness) -> None:
    response = await answered(api, edit(api, output_format="webp", size="auto"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert {"url", "b64_json"} <= set(body["data"][0])
    assert_conforms(ImagesResponse, body)


@pytest.mark.parametrize(
    ("send", "model", "prefix"),
    [
        (generate, ImageGenCompletedEvent, "image_generation"),
        (edit, ImageEditCompletedEvent, "image_edit"),
    ],
)
async def test_stream_events_conform_to_the_sdk_types(
    api: Harness, send: Any, model: Any, prefix: str
) -> None:
    response = await answered(api, send(api, stream="true" if send is edit else True))
    assert response.status_code == 200, response.text
    events = parse_sse(response.text)
    assert [e["event"] for e in events] == [f"{prefix}.completed"]
    assert_conforms(model, events[0]["data"])


# --- Idempotency-Key ----------------------------------------------------------------------


def idem(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


async def test_same_key_and_body_answer_the_same_images_charged_once(api: Harness) -> None:
    before = await api.credits()
    first = await answered(api, generate(api, idem("order-1"), n=2))
    assert first.status_code == 200, first.text
    assert await api.credits() == pytest.approx(before - 2 * PRICE)
    again = await answered(api, generate(api, idem("order-1"), n=2))
    assert again.status_code == 200, again.text
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    urls = [[item["url"] for item in r.json()["data"]] for r in (first, again)]
    assert urls[0] == urls[1] and len(set(urls[0])) == 2
    assert await api.credits() == pytest.approx(before - 2 * PRICE), "one charge for the set"
    assert len(api.store.history(api.key_id, limit=10).records) == 2


@pytest.mark.parametrize(
    "other", [{"n": 3}, {"n": 2, "prompt": "a blue fox"}, {"n": 2, "response_format": "url"}]
)
async def test_same_key_another_body_is_a_409_in_openai_shape(
    api: Harness, other: dict[str, Any]
) -> None:
    first = await answered(api, generate(api, idem("k"), n=2))
    assert first.status_code == 200, first.text
    before = await api.credits()
    refused = await generate(api, idem("k"), **other)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["param"] == "Idempotency-Key" and error["type"] == "invalid_request_error"
    assert "Idempotency-Key" in error["message"]
    assert await api.credits() == pytest.approx(before), "nothing charged"


async def test_edits_take_an_idempotency_key_too(api: Harness) -> None:
    before = await api.credits()
    price = MODELS["qwen-image-edit-fast"].price_usd
    first = await answered(api, edit(api, idem("e-1")))
    again = await answered(api, edit(api, idem("e-1")))
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    assert await api.credits() == pytest.approx(before - price)
    other = await edit(api, idem("e-1"), prompt="make it red")
    assert other.status_code == 409, other.text


async def test_a_streamed_request_replays_its_image(api: Harness) -> None:
    before = await api.credits()
    first = await answered(api, generate(api, idem("s-1"), stream=True))
    again = await answered(api, generate(api, idem("s-1"), stream=True))
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    assert parse_sse(again.text)[-1]["data"]["b64_json"] == base64.b64encode(FAKE_PNG).decode()
    assert await api.credits() == pytest.approx(before - PRICE)


async def test_a_key_used_on_v2_is_a_409_on_the_openai_route(api: Harness) -> None:
    queued = await api.http.post(
        f"/v2/{SLUG}", json={"prompt": "a red fox"}, headers={**api.headers(), **idem("shared")}
    )
    assert queued.status_code == 200, queued.text
    refused = await generate(api, idem("shared"))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["param"] == "Idempotency-Key"


async def test_a_bad_idempotency_key_is_a_400_naming_the_header(api: Harness) -> None:
    refused = await generate(api, idem("x" * 256))
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "Idempotency-Key"


# --- typo hints and the accepted list -------------------------------------------------------


async def test_a_typo_of_an_openai_field_suggests_it(api: Harness) -> None:
    refused = await generate(api, sizee="1024x1024")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "sizee"
    assert "did you mean 'size'?" in error["message"]
    accepted = error["message"].split("accepted:")[1]
    for name in ("size", "n", "response_format", "output_format", "output_compression", "steps"):
        assert f" {name}," in accepted or accepted.rstrip(")").endswith(f" {name}"), name
    assert " image," not in accepted and "base64" not in accepted and "mask" not in accepted


async def test_typos_of_slug_parameters_still_suggest_them(api: Harness) -> None:
    refused = await generate(api, stepz=4)
    assert "did you mean 'steps'?" in refused.json()["error"]["message"]
    refused = await edit(api, responce_format="url")
    assert "did you mean 'response_format'?" in refused.json()["error"]["message"]


async def test_another_slugs_parameter_keeps_the_contracts_reason(api: Harness) -> None:
    """``steps`` on a slug without it is not a typo of ``style``: the catalog says why."""
    refused = await generate(api, model="qwen-image-2.1-fast", steps=4)
    error = refused.json()["error"]
    assert error["param"] == "steps" and "did you mean" not in error["message"]
    assert "always runs" in error["message"] and "response_format" in error["message"]


async def test_one_400_names_every_bad_field(api: Harness) -> None:
    refused = await generate(api, n=11, sizee="1x1", size="big", steps=99, prompt=None)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    for name in ("n must", "'sizee'", "size must", "steps must", "prompt is required"):
        assert name in message, (name, message)
    assert json.dumps(refused.json()).count("did you mean") == 1
