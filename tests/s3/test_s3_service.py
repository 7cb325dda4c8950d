"""Media in S3 for real: `qwenserve serve --media s3://…` (and a Redis API node + worker)
against a SeaweedFS, driven as a user would, with the segmind SDK, OpenAI's SDK and httpx."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from openai import OpenAI
from segmind import SegmindClient

from tests.processes import Server, WorkerProcess
from tests.redis_server import RedisServer, needs_redis
from tests.s3_server import SeaweedServer
from tests.service.helpers import body_for, open_image, png_b64

pytestmark = pytest.mark.slow

IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF")


def media_env(s3: SeaweedServer, prefix: str, **settings: str) -> dict[str, str]:
    """What an operator sets: the AWS variables and QWENSERVE_MEDIA (plus ``settings``)."""
    return {
        **s3.env(),
        "QWENSERVE_MEDIA": s3.media_url(prefix),
        **{f"QWENSERVE_{name.upper()}": value for name, value in settings.items()},
    }


@pytest.fixture
def serve(tmp_path: Path, shared_cache: Path) -> Iterator[Callable[..., Server]]:
    """Start `qwenserve serve` processes (stopped when the test ends)."""
    servers: list[Server] = []

    def start(env: dict[str, str], *args: str) -> Server:
        server = Server(
            data_dir=tmp_path / f"data{len(servers)}",
            cache_dir=shared_cache,
            extra_env=env,
            args=list(args),
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def credits(server: Server, key: str) -> float:
    answer = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": key}, timeout=10)
    assert answer.status_code == 200, answer.text
    return float(answer.json()["credits"])


def submit(server: Server, key: str, slug: str = "qwen-image-fast", **body: object) -> str:
    answer = httpx.post(
        f"{server.url}/v2/{slug}",
        json=body_for(slug, **body),
        headers={"x-api-key": key},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["request_id"])


def wait_status(server: Server, key: str, request_id: str, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, object] = {}
    while time.monotonic() < deadline:
        answer = httpx.get(
            f"{server.url}/v2/requests/{request_id}",  # the result: status, output, error
            headers={"x-api-key": key},
            timeout=10,
        )
        assert answer.status_code < 500, answer.text
        body = dict(answer.json())
        if body.get("status") in ("COMPLETED", "FAILED"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{request_id} did not end in {timeout_s}s: {body}\n{server.logs()}")


def object_key(prefix: str, output_url: str) -> str:
    return f"{prefix}/{output_url.rsplit('/media/', 1)[1]}"


def local_media_files(server: Server) -> list[Path]:
    folder = server.data_dir / "media"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# --- the embedded server with its media in a bucket -----------------------------------------


@dataclass
class Embedded:
    """`qwenserve serve --media s3://…` (proxy URLs), shared by the module's tests."""

    server: Server
    prefix: str
    key: str

    def new_keys(self, s3: SeaweedServer, before: set[str]) -> list[str]:
        return sorted(set(s3.keys(f"{self.prefix}/")) - before)


@pytest.fixture(scope="module")
def embedded(
    seaweed: SeaweedServer, tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> Iterator[Embedded]:
    prefix = f"embedded-{secrets.token_hex(4)}"
    server = Server(
        data_dir=tmp_path_factory.mktemp("embedded"),
        cache_dir=shared_cache,
        extra_env=seaweed.env(),  # the AWS variables alone: the bucket comes as --media
        args=["--media", seaweed.media_url(prefix)],
    ).start()
    try:
        yield Embedded(server, prefix, server.create_key(credits=100.0))
    finally:
        server.stop()


def test_serve_media_s3_keeps_outputs_in_the_bucket_behind_the_api(
    seaweed: SeaweedServer, embedded: Embedded
) -> None:
    server, prefix, key = embedded.server, embedded.prefix, embedded.key
    before = set(seaweed.keys(f"{prefix}/"))
    client = SegmindClient(api_key=key, base_url=f"{server.url}/v1", timeout=120)

    result = client.run("qwen-image-fast", **body_for("qwen-image-fast", image_format="webp"))
    assert result["status"] == "COMPLETED"
    fetched = httpx.get(result["output"], timeout=30)  # proxied by the API, no key needed
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
    stored, answer = seaweed.read(object_key(prefix, result["output"]))
    assert stored == fetched.content and answer["ContentType"] == "image/webp"
    assert open_image(stored).size == (result["width"], result["height"])

    sync = client.run_sync("qwen-image-fast", **body_for("qwen-image-fast", image_format="png"))
    assert open_image(sync.content).format == "PNG"  # v1 reads its bytes back from the bucket
    assert len(embedded.new_keys(seaweed, before)) == 2
    assert local_media_files(server) == []  # nothing on the node's disk


def test_inline_inputs_and_previews_go_to_the_bucket_and_inputs_leave_with_the_job(
    seaweed: SeaweedServer, embedded: Embedded
) -> None:
    server, key = embedded.server, embedded.key
    before = set(seaweed.keys(f"{embedded.prefix}/"))
    sdk = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)
    events = list(
        sdk.images.edit(
            model="qwen-image-edit-fast",
            image=("in.png", base64.b64decode(png_b64()), "image/png"),
            prompt="make it blue",
            stream=True,
            partial_images=1,
            extra_body={"steps": 3},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    keys = embedded.new_keys(seaweed, before)
    previews = [k for k in keys if k.endswith("-p0")]
    assert len(previews) == 1  # the partial image came through the bucket
    preview, answer = seaweed.read(previews[0])
    assert preview == base64.b64decode(events[0].b64_json) and answer["ContentType"] == "image/png"
    outputs = [k for k in keys if not k.endswith("-p0")]
    # The stored inline input was deleted when the job ended: only the output is left.
    assert len(outputs) == 1
    assert seaweed.read(outputs[0])[0] == base64.b64decode(events[1].b64_json)
    assert local_media_files(server) == []


def test_presigned_urls_redirect_to_the_bucket_until_the_result_expires(
    seaweed: SeaweedServer, prefix: str, serve: Callable[..., Server]
) -> None:
    server = serve(media_env(seaweed, prefix, media_urls="presigned", result_ttl_s="120"))
    key = server.create_key(credits=10.0)
    client = SegmindClient(api_key=key, base_url=f"{server.url}/v1", timeout=120)
    result = client.run("qwen-image-fast", **body_for("qwen-image-fast"))
    assert result["status"] == "COMPLETED"

    answer = httpx.get(result["output"], timeout=30)  # not followed: what the API says
    assert answer.status_code == 307
    location = answer.headers["location"]
    assert location.startswith(f"{seaweed.endpoint_url}/{seaweed.bucket}/{prefix}/")
    expires = int(parse_qs(urlsplit(location).query)["X-Amz-Expires"][0])
    assert 100 <= expires <= 120  # the URL expires with the result
    followed = httpx.get(result["output"], follow_redirects=True, timeout=30)
    assert followed.status_code == 200
    assert followed.content == seaweed.read(object_key(prefix, result["output"]))[0]

    missing = httpx.get(f"{server.url}/media/{'A' * 32}", timeout=10)
    assert missing.status_code == 404 and "media not found" in missing.json()["error"]


def test_results_leave_the_bucket_with_their_ttl(
    seaweed: SeaweedServer, prefix: str, serve: Callable[..., Server]
) -> None:
    # The TTL counts from submission; long enough for a loaded CI machine to run the jobs.
    server = serve(media_env(seaweed, prefix, result_ttl_s="20", purge_interval_s="0.5"))
    key = server.create_key(credits=10.0)
    ids = [submit(server, key) for _ in range(2)]
    outputs = [str(wait_status(server, key, i, 20)["output"]) for i in ids]
    assert len(seaweed.keys(f"{prefix}/")) == 2
    deadline = time.monotonic() + 45
    while seaweed.keys(f"{prefix}/") and time.monotonic() < deadline:
        time.sleep(0.25)
    assert seaweed.keys(f"{prefix}/") == []  # the sweeper deleted them, not just hid them
    for output in outputs:
        gone = httpx.get(output, timeout=10)
        assert gone.status_code == 404 and "media not found" in gone.json()["error"]


def test_an_object_missing_from_the_bucket_is_a_clear_404(
    seaweed: SeaweedServer, embedded: Embedded
) -> None:
    server, key = embedded.server, embedded.key
    output = str(wait_status(server, key, submit(server, key), 60)["output"])
    assert httpx.get(output, timeout=10).status_code == 200
    seaweed.client().delete_object(
        Bucket=seaweed.bucket, Key=object_key(embedded.prefix, output)
    )  # an operator's mistake, or a lifecycle rule shorter than the TTL
    answer = httpx.get(output, timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error"] == (
        "media not found: unknown, expired, or no longer in the media store"
    )


# --- object storage faults --------------------------------------------------------------------


def test_the_bucket_back_during_the_finish_retries_completes_the_job(
    outage_seaweed: SeaweedServer, prefix: str, serve: Callable[..., Server]
) -> None:
    server = serve(media_env(outage_seaweed, prefix, media_retry_s="60"))
    key = server.create_key(credits=10.0)
    outage_seaweed.stop_process()  # unreachable before the job's finish (submits need no bucket)
    request_id = submit(server, key, steps=2)
    deadline = time.monotonic() + 60
    while "storing its image" not in server.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "storing its image" in server.logs(), server.logs()  # the finish is retrying
    outage_seaweed.start()
    body = wait_status(server, key, request_id, 90)
    assert body["status"] == "COMPLETED", body
    fetched = httpx.get(str(body["output"]), timeout=30)
    assert fetched.status_code == 200
    assert fetched.content == outage_seaweed.read(object_key(prefix, str(body["output"])))[0]


def test_a_bucket_down_past_the_retries_fails_the_job_refunded(
    outage_seaweed: SeaweedServer, prefix: str, serve: Callable[..., Server]
) -> None:
    server = serve(media_env(outage_seaweed, prefix, media_retry_s="2"))
    key = server.create_key(credits=10.0)
    before = credits(server, key)
    outage_seaweed.stop_process()
    request_id = submit(server, key)
    body = wait_status(server, key, request_id, 90)
    assert body["status"] == "FAILED", body
    assert "could not be stored" in str(body["error"]) and "refunded" in str(body["error"])
    assert credits(server, key) == pytest.approx(before, abs=1e-6)
    # A read while the bucket is down is a 503 (never a 500), without the endpoint in it.
    answer = httpx.get(f"{server.url}/media/{'B' * 32}", timeout=30)
    assert answer.status_code == 503 and "127.0.0.1" not in answer.text
    outage_seaweed.start()
    recovered = wait_status(server, key, submit(server, key), 60)
    assert recovered["status"] == "COMPLETED"


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_wrong_credentials_refuse_to_start_with_one_line(
    seaweed: SeaweedServer, prefix: str, tmp_path: Path, shared_cache: Path, command: str
) -> None:
    env = {
        **os.environ,
        **seaweed.env(secret_key="wrong-secret"),
        "QWENSERVE_DATA_DIR": str(tmp_path / "data"),
        "QWENSERVE_CACHE_DIR": str(shared_cache),
    }
    done = subprocess.run(
        [sys.executable, "-m", "qwenserve.cli.main", command, "--media", seaweed.media_url(prefix)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("qwenserve: media store: the S3 server at "), done.stderr
    assert "refused the credentials" in lines[-1] and "AWS_SECRET_ACCESS_KEY" in lines[-1]
    assert "Traceback" not in done.stderr


# --- scale-out: Redis keeps the records, the bucket the images ------------------------------


@needs_redis
@pytest.mark.redis
def test_an_api_node_and_a_worker_share_the_bucket_and_redis_holds_no_image(
    seaweed: SeaweedServer,
    prefix: str,
    serve: Callable[..., Server],
    tmp_path: Path,
    shared_cache: Path,
) -> None:
    with RedisServer() as redis_server:
        env = {**media_env(seaweed, prefix), "QWENSERVE_STORE": redis_server.url}
        api = serve(env, "--workers", "0")
        key = api.create_key(credits=10.0)
        queued = submit(api, key, "qwen-image-edit-fast")  # its inline input goes to the bucket
        assert len(seaweed.keys(f"{prefix}/")) == 1
        worker = WorkerProcess(
            store_url=redis_server.url,
            data_dir=tmp_path / "worker",
            cache_dir=shared_cache,
            extra_env=env,
        ).start()
        try:
            ids = [queued, *(submit(api, key) for _ in range(3))]
            outputs = [wait_status(api, key, i, 120) for i in ids]
        finally:
            worker.stop()
        assert all(o["status"] == "COMPLETED" for o in outputs), outputs
        objects = seaweed.keys(f"{prefix}/")
        assert sorted(objects) == sorted(
            object_key(prefix, str(o["output"])) for o in outputs
        )  # the outputs, and the edit's input deleted once its job ended
        for output in outputs:
            assert httpx.get(str(output["output"]), timeout=30).status_code == 200
        client = redis.Redis.from_url(redis_server.url)
        assert not list(client.scan_iter(match="*media*"))
        for name in client.scan_iter():
            kind = client.type(name)
            values: list[bytes] = []
            if kind == b"string":
                values = [client.get(name) or b""]
            elif kind == b"hash":
                values = list(client.hgetall(name).values())
            elif kind == b"stream":
                values = [v for _, fields in client.xrange(name) for v in fields.values()]
            for value in values:
                assert len(value) < 64 * 1024, name  # records only
                assert not value.startswith(IMAGE_MAGIC), name
