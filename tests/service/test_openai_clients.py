"""OpenAI-dialect clients as their users call them, on their defaults, against a real
`qwenserve serve` (tiny preset): the `openai` SDK without `extra_body` on every slug, litellm's
`image_generation` and LangChain's `DallEAPIWrapper`. Each raw answer is also checked against
the SDK's own types (tests/service/openai_types.py)."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from openai import OpenAI
from openai.types import ImagesResponse
from openai.types.image_gen_completed_event import ImageGenCompletedEvent
from openai.types.image_gen_partial_image_event import ImageGenPartialImageEvent
from PIL import Image

from qwenserve.api.openai_request import DEFAULT_GENERATION_MODEL
from qwenserve.catalog import MODELS
from tests.processes import Server
from tests.service.inprocess import parse_sse
from tests.service.openai_types import assert_conforms
from tests.service.test_openai_images import _png, decode

# The default model is the one test_generate_with_the_default_model runs.
TEXT_TO_IMAGE = sorted(
    slug
    for slug, spec in MODELS.items()
    if spec.generates_from_text and slug != DEFAULT_GENERATION_MODEL
)
EDITS = sorted(slug for slug, spec in MODELS.items() if spec.edits_images)


@pytest.fixture(scope="module")
def api_key(server: Server) -> str:
    return server.create_key(credits=100.0, rpm=0)


@pytest.fixture(scope="module")
def client(server: Server, api_key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=240)


def fetched_image(url: str, key: str) -> Image.Image:
    response = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("image/")
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def check_answer(raw: Any, key: str) -> ImagesResponse:
    """The raw body within the SDK's types; each item's url and b64_json the same image."""
    assert_conforms(ImagesResponse, raw.http_response.json())
    result: ImagesResponse = raw.parse()
    assert result.data
    for item in result.data:
        inline = decode(item.b64_json)
        assert item.url is not None
        assert fetched_image(item.url, key).tobytes() == inline.tobytes()
        assert result.size == f"{inline.width}x{inline.height}"
    return result


def test_generate_with_the_default_model(client: OpenAI, api_key: str) -> None:
    raw = client.images.with_raw_response.generate(prompt="a red fox")
    check_answer(raw, api_key)
    assert raw.http_response.headers["x-request-id"]


@pytest.mark.slow
@pytest.mark.parametrize("slug", TEXT_TO_IMAGE)
def test_generate_on_every_text_to_image_slug(client: OpenAI, api_key: str, slug: str) -> None:
    check_answer(client.images.with_raw_response.generate(model=slug, prompt="a red fox"), api_key)


@pytest.mark.slow
@pytest.mark.parametrize("slug", EDITS)
def test_edit_on_every_edit_slug(client: OpenAI, api_key: str, slug: str) -> None:
    raw = client.images.with_raw_response.edit(
        model=slug, image=("fox.png", _png(1), "image/png"), prompt="make the fox blue"
    )
    check_answer(raw, api_key)


def test_stream_events_conform_to_the_sdk_types(server: Server, api_key: str) -> None:
    body = {"prompt": "a kite", "stream": True, "partial_images": 2, "steps": 4}
    response = httpx.post(
        f"{server.url}/v1/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    events = parse_sse(response.text)
    assert [e["event"] for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    for event in events[:2]:
        assert_conforms(ImageGenPartialImageEvent, event["data"])
    assert_conforms(ImageGenCompletedEvent, events[2]["data"])


def test_litellm_image_generation_on_its_defaults(
    server: Server, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub
    import litellm

    call = {"prompt": "a red fox", "api_base": f"{server.url}/v1", "api_key": api_key}
    result = litellm.image_generation(model="openai/qwen-image", **call)
    (item,) = result.data
    assert decode(item.b64_json).tobytes() == fetched_image(item.url, api_key).tobytes()

    # litellm itself refuses response_format for a model it does not know (before any request);
    # its users get only the URL through extra_body, or read `url` off the default answer.
    with pytest.raises(litellm.UnsupportedParamsError, match="response_format"):
        litellm.image_generation(model="openai/qwen-image-fast", response_format="url", **call)
    only_url = litellm.image_generation(
        model="openai/qwen-image-fast", extra_body={"response_format": "url"}, **call
    )
    (item,) = only_url.data
    assert item.b64_json is None
    assert fetched_image(item.url, api_key).size == (256, 256)


def test_langchain_dalle_wrapper_returns_a_url_of_an_image(server: Server, api_key: str) -> None:
    from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper

    wrapper = DallEAPIWrapper(model="qwen-image-fast", base_url=f"{server.url}/v1", api_key=api_key)
    url = wrapper.run("a red fox")
    assert url.startswith(f"{server.url}/media/")
    image = fetched_image(url, api_key)
    assert image.format == "PNG" and image.width == image.height  # its default size 1024x1024
