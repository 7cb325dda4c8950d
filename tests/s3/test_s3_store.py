"""The S3 media store against a real SeaweedFS: the MediaStore contract, presigned URLs, the
sweeper, and the faults (refused credentials, no bucket, read-only, an unreachable server)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from qwenserve.errors import MediaUnavailable
from qwenserve.media.s3 import EXPIRY_META, S3Location, S3MediaStore
from qwenserve.media.storage import MediaConfigError, new_media_id
from tests.s3.conftest import open_store, use_credentials
from tests.s3_server import SeaweedServer


@pytest.fixture
def store(
    seaweed: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[S3MediaStore]:
    use_credentials(monkeypatch, seaweed.env())
    media = open_store(seaweed, prefix, ttl_s=30.0)
    yield media
    media.close()


def test_an_item_is_one_object_under_the_prefix_with_its_type_and_expiry(
    store: S3MediaStore, seaweed: SeaweedServer, prefix: str
) -> None:
    media_id, now = new_media_id(), time.time()
    data = os.urandom(200_000)
    store.put(media_id, data, "image/webp", expires_at=now + 60)
    assert store.get(media_id, now=now) == (data, "image/webp")
    assert seaweed.keys(f"{prefix}/") == [f"{prefix}/{media_id}"]
    stored, answer = seaweed.read(f"{prefix}/{media_id}")
    assert stored == data and answer["ContentType"] == "image/webp"
    assert float(answer["Metadata"][EXPIRY_META]) == pytest.approx(now + 60)


def test_expired_missing_and_unknown_items_read_as_none(
    store: S3MediaStore, seaweed: SeaweedServer, prefix: str
) -> None:
    media_id, now = new_media_id(), time.time()
    store.put(media_id, b"x", "image/png", expires_at=now + 10)
    assert store.get(media_id, now=now + 9.9) is not None
    assert store.get(media_id, now=now + 10) is None  # hidden from its expiry on
    assert store.presigned_url(media_id, now=now + 10) is None
    seaweed.client().delete_object(Bucket=seaweed.bucket, Key=f"{prefix}/{media_id}")
    assert store.get(media_id, now=now) is None  # gone from the bucket under us: not an error
    assert store.presigned_url(media_id, now=now) is None
    assert store.get(new_media_id(), now=now) is None


def test_delete_is_idempotent(store: S3MediaStore, seaweed: SeaweedServer, prefix: str) -> None:
    media_id = new_media_id()
    store.put(media_id, b"x", "image/png", expires_at=time.time() + 60)
    store.delete(media_id)
    store.delete(media_id)
    assert seaweed.keys(f"{prefix}/") == []


@pytest.mark.parametrize("media_id", ["../../etc/passwd", "a/b", "short", "x" * 200, "id.json"])
def test_ids_outside_the_charset_never_become_keys(
    store: S3MediaStore, seaweed: SeaweedServer, prefix: str, media_id: str
) -> None:
    with pytest.raises(ValueError):
        store.put(media_id, b"x", "image/png", expires_at=time.time() + 60)
    assert store.get(media_id, now=time.time()) is None
    assert store.presigned_url(media_id, now=time.time()) is None
    store.delete(media_id)
    assert seaweed.keys(f"{prefix}/") == []


def test_a_presigned_url_serves_the_object_and_expires_with_it(store: S3MediaStore) -> None:
    media_id, now = new_media_id(), time.time()
    store.put(media_id, b"\x89PNG-bytes", "image/png", expires_at=now + 90)
    url = store.presigned_url(media_id, now=now)
    assert url is not None
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["90"]
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200
    assert answer.content == b"\x89PNG-bytes"
    assert answer.headers["content-type"] == "image/png"
    tampered = url.replace(media_id, new_media_id())
    assert httpx.get(tampered, timeout=10).status_code == 403  # the signature covers the key


def test_the_sweeper_deletes_what_outlived_the_ttl_and_nothing_else(
    seaweed: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_credentials(monkeypatch, seaweed.env())
    store = open_store(seaweed, prefix, ttl_s=30.0)
    try:
        ids = [new_media_id() for _ in range(3)]
        for media_id in ids:
            store.put(media_id, b"img", "image/png", expires_at=time.time() + 30)
        client = seaweed.client()
        foreign = [f"{prefix}/notes.txt", f"{prefix}/nested/{new_media_id()}", f"{prefix}x/y"]
        for key in foreign:
            client.put_object(Bucket=seaweed.bucket, Key=key, Body=b"not ours")
        assert store.purge_expired(now=time.time()) == 0  # written just now: all within the TTL
        assert store.purge_expired(now=time.time() + 31) == 3
        left = set(seaweed.keys(f"{prefix}"))
        assert left == set(foreign)  # only media ids directly under the prefix are ours
        assert all(store.get(m, now=time.time()) is None for m in ids)
    finally:
        store.close()


def test_many_threads_share_one_client(store: S3MediaStore) -> None:
    """Workers, the finisher and the API's thread pool call at once; one pooled client serves
    them all and every item reads back as written."""
    errors: list[BaseException] = []
    now = time.time()

    def work(n: int) -> None:
        try:
            for i in range(5):
                media_id = new_media_id()
                data = f"{n}-{i}".encode() * 1000
                store.put(media_id, data, "image/png", expires_at=now + 60)
                assert store.get(media_id, now=now) == (data, "image/png")
                store.delete(media_id)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


# --- startup refusals: one line that says why -----------------------------------------------


def test_wrong_credentials_are_refused_at_open(
    seaweed: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_credentials(monkeypatch, seaweed.env(secret_key="not-the-secret"))
    with pytest.raises(MediaConfigError, match="refused the credentials") as refused:
        open_store(seaweed, prefix)
    assert "AWS_SECRET_ACCESS_KEY" in str(refused.value) and "\n" not in str(refused.value)


def test_missing_credentials_are_named(
    seaweed: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    use_credentials(monkeypatch, {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "HOME": "/"})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(MediaConfigError, match="no S3 credentials"):
        open_store(seaweed, prefix)


def test_read_only_credentials_are_refused_at_open(
    seaweed: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_credentials(monkeypatch, seaweed.reader_env())
    with pytest.raises(MediaConfigError, match="may not write"):
        open_store(seaweed, prefix)


def test_a_missing_bucket_is_refused_at_open(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_credentials(monkeypatch, seaweed.env())
    with pytest.raises(MediaConfigError, match="no bucket 'no-such-bucket'"):
        S3MediaStore.open("s3://no-such-bucket/x", ttl_s=60, endpoint_url=seaweed.endpoint_url)


def test_an_unreachable_server_and_a_bad_url_are_refused_at_open(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_credentials(monkeypatch, seaweed.env())
    with pytest.raises(MediaConfigError, match="cannot reach"):
        S3MediaStore.open("s3://b/x", ttl_s=60, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(MediaConfigError, match="s3://BUCKET"):
        S3MediaStore.open("gs://b/x", ttl_s=60, endpoint_url=seaweed.endpoint_url)


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://b", "b", ""),
        ("s3://b/", "b", ""),
        ("s3://b/out", "b", "out/"),
        ("s3://b/a/b/", "b", "a/b/"),
    ],
)
def test_locations_parse(url: str, bucket: str, prefix: str) -> None:
    location = S3Location.parse(url)
    assert (location.bucket, location.prefix) == (bucket, prefix)
    assert location.key("abcdefgh") == f"{prefix}abcdefgh"


# --- the server going away and coming back --------------------------------------------------


def test_an_unreachable_bucket_is_media_unavailable_until_it_returns(
    own_seaweed: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_credentials(monkeypatch, own_seaweed.env())
    store = open_store(own_seaweed, prefix)
    try:
        kept = new_media_id()
        store.put(kept, b"kept", "image/png", expires_at=time.time() + 300)
        own_seaweed.stop_process()
        with pytest.raises(MediaUnavailable) as down:
            store.put(new_media_id(), b"x", "image/png", expires_at=time.time() + 60)
        assert down.value.http_status == 503
        assert "127.0.0.1" not in down.value.message  # the endpoint goes to the log only
        with pytest.raises(MediaUnavailable):
            store.get(kept, now=time.time())
        own_seaweed.start()
        # The same client (its pool) carries on once the server is back.
        assert store.get(kept, now=time.time()) == (b"kept", "image/png")
        fresh = new_media_id()
        store.put(fresh, b"fresh", "image/png", expires_at=time.time() + 60)
        assert store.get(fresh, now=time.time()) == (b"fresh", "image/png")
    finally:
        store.close()
