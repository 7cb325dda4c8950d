"""The official `segmind` SDK, unchanged, against a real qwenserve server."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import segmind
from segmind import InferenceFailed, SegmindClient

from qwenserve.catalog import ALL_MODELS, MODELS
from tests.processes import Server
from tests.service.helpers import body_for, file_server, open_image, png_b64

SLUGS = [m.slug for m in ALL_MODELS]
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def api_key(server: Server) -> str:
    return server.create_key(credits=100.0, rpm=0)


@pytest.fixture(scope="module")
def client(server: Server, api_key: str) -> SegmindClient:
    return SegmindClient(api_key=api_key, base_url=f"{server.url}/v1", timeout=120)


@pytest.mark.parametrize("slug", SLUGS)
def test_v1_returns_image_bytes_with_headers(client: SegmindClient, slug: str) -> None:
    fmt = "jpeg" if slug != "qwen-image-2512" else "png"
    response = client.run_sync(slug, **body_for(slug, image_format=fmt, quality=80))
    assert response.headers["content-type"] == f"image/{fmt}"
    image = open_image(response.content)
    assert image.format == FORMATS[fmt]
    metadata = json.loads(response.headers["x-output-metadata"])
    assert (metadata["width"], metadata["height"]) == image.size
    assert float(response.headers["x-generation-time"]) > 0
    assert float(response.headers["x-remaining-credits"]) < 100.0
    assert response.headers["x-request-id"]
    if slug == "qwen-image-2512":
        assert image.size == (256, 256)


@pytest.mark.parametrize("slug", SLUGS)
def test_v2_run_returns_media_url(client: SegmindClient, slug: str) -> None:
    result = client.run(slug, **body_for(slug, image_format="webp"))
    assert result["status"] == "COMPLETED"
    assert result["metrics"]["inference_time"] > 0
    media = httpx.get(result["output"], timeout=30)
    assert media.status_code == 200
    assert media.headers["content-type"] == "image/webp"
    assert open_image(media.content).size == (result["width"], result["height"])


def test_base64_in_both_apis_and_2512_spelling(client: SegmindClient) -> None:
    v1 = client.run_sync("qwen-image-fast", **body_for("qwen-image-fast", base64=True))
    assert v1.headers["content-type"].startswith("application/json")
    image = open_image(base64.b64decode(v1.json()["image"]))
    assert image.format == "PNG"
    v2 = client.run("qwen-image-2512", **body_for("qwen-image-2512", base_64=True, width=320))
    decoded = open_image(base64.b64decode(v2["output"]))
    assert decoded.size == (320, 256) and decoded.format == "WEBP"


def test_seed_is_reported_and_reproducible(client: SegmindClient) -> None:
    body = body_for("qwen-image-fast", seed=4242)
    first = client.run_sync("qwen-image-fast", **body)
    second = client.run_sync("qwen-image-fast", **body)
    assert json.loads(first.headers["x-output-metadata"])["seed"] == 4242
    assert first.content == second.content
    random_seed = client.run("qwen-image-fast", **body_for("qwen-image-fast", seed=-1))
    assert 0 <= random_seed["seed"] <= 2**31 - 1


def test_submit_async_job_handle(client: SegmindClient) -> None:
    job = client.submit_async("qwen-image", **body_for("qwen-image", aspect_ratio="9:16"))
    assert job.submit_response["status"] == "QUEUED"
    assert job.status_url.startswith("http://127.0.0.1")
    assert job.submit_response["poll_url"] == job.status_url
    result = job.wait(timeout=120, interval=0.1)
    assert result["width"] < result["height"]
    status = job.status()
    assert status["status"] == "COMPLETED" and "output" not in status
    assert status["metrics"]["inference_time"] == result["metrics"]["inference_time"]


def test_edit_from_url_input(server: Server, client: SegmindClient) -> None:
    png = base64.b64decode(png_b64((96, 64)))
    with file_server({"/in.png": (200, png, "image/png", 0.0)}) as base:
        result = client.run(
            "qwen-image-edit-fast", **body_for("qwen-image-edit-fast", image=f"{base}/in.png")
        )
    assert result["width"] > result["height"], "output matches the input's aspect"


def test_failed_job_is_422_with_error_and_refunded(
    server: Server, client: SegmindClient, api_key: str
) -> None:
    before = segmind_credits(server, api_key)
    with file_server({}) as base:
        job = client.submit_async(
            "qwen-image-edit-fast", **body_for("qwen-image-edit-fast", image=f"{base}/missing.png")
        )
        with pytest.raises(InferenceFailed) as caught:
            job.wait(timeout=60, interval=0.1)
    assert "image" in (caught.value.detail or "")
    raw = httpx.get(job.status_url, headers={"x-api-key": api_key})
    assert raw.status_code == 422 and raw.json()["status"] == "FAILED"
    result = httpx.get(job.response_url, headers={"x-api-key": api_key})
    assert result.status_code == 422 and result.json()["error"]
    assert segmind_credits(server, api_key) == pytest.approx(before)


def segmind_credits(server: Server, api_key: str) -> float:
    response = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": api_key})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"credits", "free-credits"}
    return float(body["credits"])


def test_credits_debited_by_price(server: Server) -> None:
    key = server.create_key(credits=1.0)
    client = SegmindClient(api_key=key, base_url=f"{server.url}/v1", timeout=120)
    client.run_sync("qwen-image", **body_for("qwen-image"))
    assert segmind_credits(server, key) == pytest.approx(1.0 - 0.121)


def test_module_level_functions_with_env_key(
    server: Server, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        segmind, "_default_client", SegmindClient(api_key=api_key, base_url=f"{server.url}/v1")
    )
    result = segmind.run("qwen-image-fast", **body_for("qwen-image-fast"))
    assert result["status"] == "COMPLETED"


@pytest.mark.parametrize("slug", ["qwen-image-2.1", "qwen-image-2.1-fast"])
def test_qwen_image_21_text_only_and_many_references(client: SegmindClient, slug: str) -> None:
    """2.1's references are optional (text-to-image) and go up to ten, on v1 and v2."""
    text_only = {k: v for k, v in body_for(slug, width=288, height=256).items() if k != "image_1"}
    v1 = client.run_sync(slug, **text_only)
    assert open_image(v1.content).size == (288, 256)
    references = {f"image_{i}": png_b64((96, 64) if i % 2 == 0 else (64, 96)) for i in range(1, 11)}
    v2 = client.run(slug, **{**body_for(slug, image_format="png"), **references})
    assert v2["status"] == "COMPLETED"
    media = httpx.get(v2["output"], timeout=30)
    assert open_image(media.content).format == "PNG"
    assert v2["width"] > v2["height"], "match_input_image follows the last (wide) reference"


@pytest.mark.parametrize("slug", SLUGS)
def test_sdk_defaults_fill_every_parameter_but_the_prompt_and_images(
    client: SegmindClient, slug: str
) -> None:
    """``client.run(slug, prompt=...)`` as a user first writes it: no ``steps`` (which three
    seed pages mark "required" with a default), so the page's default is used."""
    spec = MODELS[slug]
    images = {name: png_b64() for name in spec.image_fields[:1] if not spec.generates_from_text}
    result = client.run(slug, prompt="a lighthouse at dusk", **images)
    assert result["status"] == "COMPLETED"
    assert open_image(httpx.get(result["output"], timeout=30).content).size == (
        result["width"],
        result["height"],
    )
