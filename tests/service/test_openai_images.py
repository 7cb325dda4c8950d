"""The official `openai` SDK, unchanged, against a real qwenserve server (tiny preset): the
images API on the same engine, queue, keys and credits as the Segmind routes."""

from __future__ import annotations

import base64
import io
import time

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from qwenserve.catalog import MODELS
from tests.processes import Server, free_port


@pytest.fixture(scope="module")
def api_key(server: Server) -> str:
    return server.create_key(credits=100.0, rpm=0)


@pytest.fixture(scope="module")
def client(server: Server, api_key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def decode(b64: str | None) -> Image.Image:
    assert b64
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _png(seed: int) -> bytes:
    """A small PNG file (96x64) as a multipart image part."""
    image = Image.new("RGB", (96, 64), (seed * 40 % 256, 120, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def credits(server: Server, key: str) -> float:
    response = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": key})
    return float(response.json()["credits"])


def test_generate_answers_b64_json_and_url_by_default(client: OpenAI) -> None:
    result = client.images.generate(
        model="qwen-image-fast", prompt="a red kite", size="1024x1024", extra_body={"steps": 2}
    )
    assert result.data is not None and len(result.data) == 1
    image = decode(result.data[0].b64_json)
    url = result.data[0].url
    assert url is not None and httpx.get(url).content == base64.b64decode(result.data[0].b64_json)
    assert image.format == "PNG"
    assert result.size == f"{image.width}x{image.height}"
    assert image.width == image.height  # 1024x1024 → the 1:1 ratio
    assert result.output_format == "png" and result.created > 0


def test_generate_url_serves_the_image(client: OpenAI) -> None:
    result = client.images.generate(
        model="qwen-image-fast",
        prompt="a red kite",
        response_format="url",
        output_format="jpeg",
        output_compression=70,
        extra_body={"steps": 2},
    )
    assert result.data is not None
    url = result.data[0].url
    assert url is not None and "/media/" in url and url.startswith("http")
    assert result.data[0].b64_json is None  # asked for url: only that
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"


def test_n_images_are_distinct_and_seeds_reproduce(client: OpenAI) -> None:
    two = client.images.generate(
        model="qwen-image-fast", prompt="a kite", n=2, extra_body={"steps": 2}
    )
    assert two.data is not None and len(two.data) == 2
    assert two.data[0].b64_json != two.data[1].b64_json

    def seeded() -> list[str | None]:
        got = client.images.generate(
            model="qwen-image-fast", prompt="a kite", n=2, extra_body={"steps": 2, "seed": 7}
        )
        assert got.data is not None
        return [d.b64_json for d in got.data]

    first, again = seeded(), seeded()
    assert first == again  # same seeds, same images
    assert first[0] != first[1]  # seed 7 and 8


def test_exact_size_where_the_slug_takes_width_and_height(client: OpenAI) -> None:
    result = client.images.generate(
        model="qwen-image-2512", prompt="a kite", size="320x256", extra_body={"steps": 2}
    )
    assert result.data is not None
    assert decode(result.data[0].b64_json).size == (320, 256)
    assert result.size == "320x256"


def test_edit_one_image(client: OpenAI) -> None:
    result = client.images.edit(
        model="qwen-image-edit-fast",
        image=("in.png", _png(1), "image/png"),
        prompt="make it blue",
        extra_body={"steps": 2},
    )
    assert result.data is not None and len(result.data) == 1
    assert decode(result.data[0].b64_json).format in ("PNG", "WEBP", "JPEG")


def test_edit_plus_with_two_images(client: OpenAI) -> None:
    result = client.images.edit(
        model="qwen-image-edit-plus-product-photography",
        image=[("a.png", _png(1), "image/png"), ("b.png", _png(2), "image/png")],
        prompt="put the product on a beach",
        output_format="png",
        size="1024x1024",
    )
    assert result.data is not None
    image = decode(result.data[0].b64_json)
    assert image.format == "PNG" and image.width == image.height


def test_qwen_image_21_generates_and_edits(client: OpenAI) -> None:
    """One 2.1 slug serves both routes: no references on generations, references on edits."""
    # The fast slug (Turbo) takes no steps: it always runs its 8.
    made = client.images.generate(model="qwen-image-2.1-fast", prompt="a kite", size="288x256")
    assert made.data is not None
    assert decode(made.data[0].b64_json).size == (288, 256)
    edited = client.images.edit(
        model="qwen-image-2.1",
        image=[("a.png", _png(1), "image/png"), ("b.png", _png(2), "image/png")],
        prompt="the two side by side",
        extra_body={"steps": 2},
    )
    assert edited.data is not None and len(edited.data) == 1


def test_mask_is_refused_naming_it(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            model="qwen-image-edit-fast",
            image=("in.png", _png(1), "image/png"),
            mask=("mask.png", _png(3), "image/png"),
            prompt="make it blue",
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "mask"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("kind", "model"), [("generate", "qwen-image-edit-fast"), ("edit", "qwen-image-fast")]
)
def test_wrong_model_kind_is_a_400_naming_model(client: OpenAI, kind: str, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        if kind == "generate":
            client.images.generate(model=model, prompt="a kite")
        else:
            client.images.edit(model=model, image=("in.png", _png(1), "image/png"), prompt="x")
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "model"
    assert "/v1/images/" in body["message"]


def test_unknown_model_is_a_404_in_openai_shape(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt="a kite")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "qwen-image-fast" in body["message"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "big"}, "size"),
        ({"size": "4096x4096", "model": "qwen-image-2512"}, "size"),
        ({"n": 11}, "n"),
        ({"background": "transparent"}, "background"),
        ({"extra_body": {"steps": 99}}, "steps"),
        ({"extra_body": {"sampler": "euler"}}, "sampler"),
        ({"extra_body": {"base64": True}}, "base64"),
    ],
)
def test_bad_fields_are_400s_naming_them(
    client: OpenAI, kwargs: dict[str, object], param: str
) -> None:
    kwargs = {"model": "qwen-image-fast", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a kite", **kwargs)  # type: ignore[arg-type]
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == param, body


def test_bearer_and_x_api_key_both_authenticate(server: Server, api_key: str) -> None:
    body = {"model": "qwen-image-fast", "prompt": "a kite", "steps": 2}
    for headers in ({"Authorization": f"Bearer {api_key}"}, {"x-api-key": api_key}):
        response = httpx.post(
            f"{server.url}/v1/images/generations", json=body, headers=headers, timeout=60
        )
        assert response.status_code == 200, response.text
    bad = OpenAI(base_url=f"{server.url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.images.generate(model="qwen-image-fast", prompt="a kite")
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_api_key"


def test_credits_debited_per_image_and_refunded_on_failure(server: Server) -> None:
    key = server.create_key(credits=10.0, rpm=0)
    sdk = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)
    price = MODELS["qwen-image-fast"].price_usd
    before = credits(server, key)
    sdk.images.generate(model="qwen-image-fast", prompt="a kite", n=3, extra_body={"steps": 2})
    assert credits(server, key) == pytest.approx(before - 3 * price, abs=1e-6)

    before = credits(server, key)
    dead = f"http://127.0.0.1:{free_port()}/missing.safetensors"  # the worker's fetch fails
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.images.edit(
            model="qwen-image-edit-plus-product-photography",
            image=("in.png", _png(1), "image/png"),
            prompt="on a beach",
            extra_body={"lora_2_url": dead},
        )
    assert caught.value.status_code == 400, "the caller's URL is at fault: no 5xx"
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "lora_2_url"
    assert credits(server, key) == pytest.approx(before, abs=1e-6)


def test_stream_sends_partial_images_then_completed(client: OpenAI) -> None:
    events = list(
        client.images.generate(
            model="qwen-image-fast",
            prompt="a kite",
            stream=True,
            partial_images=2,
            size="1536x1024",
            extra_body={"steps": 4, "seed": 5},
        )
    )
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partials = [decode(e.b64_json) for e in events[:2]]
    final = decode(events[2].b64_json)
    assert [e.partial_image_index for e in events[:2]] == [0, 1]  # type: ignore[union-attr]
    assert all(p.format == "PNG" and p.size == final.size for p in partials)
    assert final.width > final.height  # 1536x1024 → 3:2
    assert events[2].size == f"{final.width}x{final.height}"
    assert partials[0].tobytes() != partials[1].tobytes()


def test_edit_stream_uses_image_edit_events(client: OpenAI) -> None:
    events = list(
        client.images.edit(
            model="qwen-image-edit-fast",
            image=("in.png", _png(1), "image/png"),
            prompt="make it blue",
            stream=True,
            partial_images=1,
            extra_body={"steps": 3},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert decode(events[0].b64_json).size == decode(events[1].b64_json).size


def test_a_refused_image_refunds_its_siblings(server: Server) -> None:
    price = MODELS["qwen-image-fast"].price_usd
    key = server.create_key(credits=2.5 * price, rpm=0)  # pays for two images, not three
    sdk = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)
    before = credits(server, key)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.images.generate(model="qwen-image-fast", prompt="a kite", n=3, extra_body={"steps": 2})
    assert caught.value.status_code == 406
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "insufficient_quota"
    # The two accepted ones were cancelled: refunded at once if queued, at their next step (or
    # when they end) if a worker had started them.
    deadline = time.monotonic() + 30
    while credits(server, key) != pytest.approx(before, abs=1e-6) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert credits(server, key) == pytest.approx(before, abs=1e-6)
