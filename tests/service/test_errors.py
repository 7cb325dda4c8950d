"""Every error code the seeds list, each with a real trigger, as JSON {"error": ...}."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from segmind import InferenceFailed, SegmindClient, SegmindError

from qwenserve.errors import FieldError, InvalidInput, rebuild_error
from tests.processes import Server
from tests.service.helpers import body_for, file_server, png_b64


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return server.create_key(credits=50.0, rpm=0)


def post(
    server: Server,
    path: str,
    key: str | None,
    headers: dict[str, str] | None = None,
    **kwargs: object,
) -> httpx.Response:
    all_headers = {**(headers or {}), **({"x-api-key": key} if key else {})}
    return httpx.post(f"{server.url}{path}", headers=all_headers, timeout=60, **kwargs)  # type: ignore[arg-type]


def assert_error(response: httpx.Response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    for needle in needles:
        assert needle in message, message
    assert "Traceback" not in message
    return message


def test_400_names_the_field(server: Server, key: str) -> None:
    for path in ("/v1/qwen-image-fast", "/v2/qwen-image-fast"):
        response = post(server, path, key, json={"prompt": "x", "steps": 17})
        assert_error(response, 400, "steps", "between 1 and 16")
    assert_error(post(server, "/v1/qwen-image-fast", key, json={"steps": 8}), 400, "prompt")
    response = post(
        server, "/v1/qwen-image", key, json={"prompt": "x", "steps": 30, "aspect_ratio": "5:4"}
    )
    assert_error(response, 400, "aspect_ratio")


def test_400_names_every_bad_field_and_the_sdk_shows_them(server: Server, key: str) -> None:
    body = {"prompt": "x", "steps": 17, "aspect_ratio": "5:4", "quality": 101}
    response = post(server, "/v2/qwen-image-fast", key, json=body)
    message = assert_error(response, 400, "steps", "aspect_ratio", "quality")
    assert [e["field"] for e in response.json()["errors"]] == ["steps", "aspect_ratio", "quality"]
    client = SegmindClient(api_key=key, base_url=f"{server.url}/v1")
    for call in (client.run_sync, client.submit_async):
        with pytest.raises(SegmindError) as caught:
            call("qwen-image-fast", **body)
        assert caught.value.status == 400
        assert caught.value.detail == message, "the SDK shows every bad field"


def test_400_malformed_json_and_non_object(server: Server, key: str) -> None:
    response = post(
        server,
        "/v2/qwen-image",
        key,
        content=b'{"prompt": "x",',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "malformed JSON")
    assert_error(post(server, "/v2/qwen-image", key, json=[1, 2]), 400, "JSON object")
    assert_error(post(server, "/v2/qwen-image", key, content=b""), 400, "empty")


def test_400_undecodable_input_image_fails_the_job(server: Server, key: str) -> None:
    garbage = base64.b64encode(b"not an image at all" * 10).decode()
    response = post(
        server,
        "/v1/qwen-image-edit-fast",
        key,
        json=body_for("qwen-image-edit-fast", image=garbage),
    )
    assert_error(response, 400, "image")


def test_400_undecodable_input_image_on_v2_is_refused_at_submit_unpaid(server: Server) -> None:
    own = server.create_key(credits=5.0)
    garbage = base64.b64encode(b"GIF89a" + b"x" * 64).decode()
    body = body_for("qwen-image-edit-plus-product-photography", image_1=png_b64(), image_2=garbage)
    response = post(server, "/v2/qwen-image-edit-plus-product-photography", own, json=body)
    assert_error(response, 400, "image_2", "GIF")
    credits = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": own}).json()
    assert credits["credits"] == pytest.approx(5.0), "nothing charged, nothing queued"


def test_401_missing_and_unknown_key(server: Server) -> None:
    assert_error(post(server, "/v1/qwen-image", None, json=body_for("qwen-image")), 401, "API key")
    assert_error(post(server, "/v1/qwen-image", "qs_nope", json=body_for("qwen-image")), 401)
    bearer = httpx.get(
        f"{server.url}/v1/get-user-credits", headers={"Authorization": "Bearer qs_nope"}
    )
    assert_error(bearer, 401)


def test_bearer_auth_works(server: Server, key: str) -> None:
    response = httpx.get(
        f"{server.url}/v1/get-user-credits", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200


def test_403_model_not_allowed(server: Server) -> None:
    limited = server.create_key("--models", "qwen-image-fast", credits=5.0)
    assert_error(
        post(server, "/v2/qwen-image", limited, json=body_for("qwen-image")), 403, "qwen-image"
    )
    assert (
        post(server, "/v2/qwen-image-fast", limited, json=body_for("qwen-image-fast")).status_code
        == 200
    )


def test_404_unknown_model_request_and_route(server: Server, key: str) -> None:
    assert_error(post(server, "/v1/flux-dev", key, json={"prompt": "x"}), 404, "flux-dev")
    missing = httpx.get(
        f"{server.url}/v2/requests/00000000-0000-0000-0000-000000000000/status",
        headers={"x-api-key": key},
    )
    assert_error(missing, 404)
    assert_error(httpx.get(f"{server.url}/nope"), 404)
    assert_error(httpx.get(f"{server.url}/media/does-not-exist"), 404)


def test_406_insufficient_credits_nothing_queued(server: Server) -> None:
    poor = server.create_key(credits=0.1)  # qwen-image costs 0.121
    assert_error(post(server, "/v2/qwen-image", poor, json=body_for("qwen-image")), 406, "credit")
    credits = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": poor}).json()
    assert credits["credits"] == pytest.approx(0.1)
    client = SegmindClient(api_key=poor, base_url=f"{server.url}/v1")
    with pytest.raises(SegmindError) as caught:
        client.run_sync("qwen-image", **body_for("qwen-image"))
    assert caught.value.status == 406


def test_406_with_an_inline_image_keeps_nothing(server: Server) -> None:
    def stored_inputs() -> set[Path]:
        # Uploaded inputs are the octet-stream items (outputs of earlier tests' jobs are images).
        metas = (server.data_dir / "media").rglob("*.json")
        return {m for m in metas if "application/octet-stream" in m.read_text()}

    poor = server.create_key(credits=0.001)
    before = stored_inputs()
    body = body_for("qwen-image-edit-fast", image=png_b64())
    assert_error(post(server, "/v2/qwen-image-edit-fast", poor, json=body), 406, "credit")
    assert stored_inputs() - before == set(), "the refused request's uploaded image is not kept"


def test_429_rate_limit_with_headers(server: Server) -> None:
    limited = server.create_key(credits=10.0, rpm=2)
    for _ in range(2):
        assert (
            post(
                server, "/v2/qwen-image-fast", limited, json=body_for("qwen-image-fast")
            ).status_code
            == 200
        )
    response = post(server, "/v2/qwen-image-fast", limited, json=body_for("qwen-image-fast"))
    assert_error(response, 429)
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-rate-limit-remaining"] == "0"
    reset_at = response.headers["x-rate-limit-reset-at-utc"]
    reset = datetime.strptime(reset_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert 0 < reset.timestamp() - time.time() <= 61


def test_an_input_url_that_fails_is_a_4xx_naming_the_field(server: Server, key: str) -> None:
    """The caller's URL is at fault (a retry cannot help): 400 on v1 naming ``image``, FAILED
    with the same words on v2, refunded (``metrics.cost`` 0); never a 5xx of this server."""
    page = b"<!DOCTYPE html><html><body>Sign in</body></html>"
    routes = {
        "/login": (200, page, "text/html; charset=utf-8", 0.0),
        "/broken.png": (500, b"boom", "text/plain", 0.0),
        "/slow.png": (200, base64.b64decode(png_b64()), "image/png", 5.0),
    }
    with file_server(routes) as base:
        cases = {
            f"{base}/missing.png": "image: could not fetch the URL (HTTP 404)",
            f"{base}/login": "image: not an image (got text/html)",
            f"{base}/broken.png": "image: could not fetch the URL (HTTP 500)",
            "http://qwenserve-test.invalid/in.png": "image: could not resolve the host",
            f"{base}/slow.png": "image: the URL did not answer in time",
        }
        client = SegmindClient(api_key=key, base_url=f"{server.url}/v1")
        for url, words in cases.items():
            body = body_for("qwen-image-edit-fast", image=url)
            v1 = post(server, "/v1/qwen-image-edit-fast", key, json=body)
            assert_error(v1, 400, words)
            assert [e["field"] for e in v1.json()["errors"]] == ["image"]
            job = client.submit_async("qwen-image-edit-fast", **body)
            with pytest.raises(InferenceFailed):
                job.wait(timeout=60, interval=0.1)
            status = httpx.get(job.status_url, headers={"x-api-key": key})
            assert status.status_code == 422 and status.json()["status"] == "FAILED"
            assert words in status.json()["error"]
            assert status.json()["metrics"]["cost"] == 0, "refunded: as its history says"


def test_a_prompt_longer_than_an_edit_model_takes_is_refused_at_submit_everywhere(
    server: Server,
) -> None:
    own = server.create_key(credits=5.0)
    body = body_for("qwen-image-edit-fast", prompt="山" * 9_000)
    for path in ("/v1/qwen-image-edit-fast", "/v2/qwen-image-edit-fast"):
        response = post(server, path, own, json=body)
        assert_error(response, 400, "prompt is", "tokens long; this model takes at most 1024")
        assert [e["field"] for e in response.json()["errors"]] == ["prompt"]
    credits = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": own}).json()
    assert credits["credits"] == pytest.approx(5.0), "nothing charged, nothing queued"


def test_a_stored_input_failure_keeps_its_field() -> None:
    """v1 answers a FAILED job's stored error: its field comes back from the message."""
    error = rebuild_error("InputUnavailable", "image_2: could not fetch the URL (HTTP 404)")
    assert isinstance(error, InvalidInput) and error.http_status == 400
    assert error.errors == (FieldError("image_2", error.message),)
    tokens = rebuild_error("InvalidInput", "prompt is 2000 tokens long; this model takes 1024")
    assert tokens.field == "prompt"
    whole = rebuild_error("InvalidInput", "this model edits exactly one image")
    assert whole.errors == (FieldError("body", whole.message),), "never an empty list"


def test_ssrf_refused_by_default(make_server: object) -> None:
    strict: Server = make_server()  # type: ignore[operator]
    strict.start()
    key = strict.create_key(credits=5.0)
    png = base64.b64decode(png_b64())
    with file_server({"/in.png": (200, png, "image/png", 0.0)}) as base:
        response = post(
            strict,
            "/v1/qwen-image-edit-fast",
            key,
            json=body_for("qwen-image-edit-fast", image=f"{base}/in.png"),
        )
    assert_error(response, 400, "image")


def test_500_engine_failure_is_failed_and_refunded(make_server: object, tmp_path: object) -> None:
    broken: Server = make_server(env={"QWENSERVE_WEIGHTS": "/nonexistent/weights"})  # type: ignore[operator]
    broken.start()
    key = broken.create_key(credits=1.0)
    response = post(broken, "/v1/qwen-image-fast", key, json=body_for("qwen-image-fast"))
    assert_error(response, 500)
    credits = httpx.get(f"{broken.url}/v1/get-user-credits", headers={"x-api-key": key}).json()
    assert credits["credits"] == pytest.approx(1.0)


def test_504_sync_timeout_keeps_the_job(make_server: object) -> None:
    impatient: Server = make_server(env={"QWENSERVE_SYNC_TIMEOUT_S": "0.05"})  # type: ignore[operator]
    impatient.start()
    key = impatient.create_key(credits=5.0)
    response = post(impatient, "/v1/qwen-image", key, json=body_for("qwen-image", steps=4))
    assert_error(response, 504, "/v2/requests/")
    request_id = response.headers["x-request-id"]
    client = SegmindClient(api_key=key, base_url=f"{impatient.url}/v1")
    deadline = time.time() + 60
    while time.time() < deadline:
        status = httpx.get(
            f"{impatient.url}/v2/requests/{request_id}/status", headers={"x-api-key": key}
        ).json()
        if status["status"] == "COMPLETED":
            break
        time.sleep(0.2)
    assert status["status"] == "COMPLETED"
    del client
