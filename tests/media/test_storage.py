"""The media store contract, run against every implementation, plus the file layout."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from qwenserve.media.storage import (
    LocalMediaStore,
    MediaStore,
    MemoryMediaStore,
    new_media_id,
)

NOW = 1_700_000_000.0


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MediaStore:
    factories: dict[str, Callable[[], MediaStore]] = {
        "local": lambda: LocalMediaStore(tmp_path / "media"),
        "memory": MemoryMediaStore,
    }
    return factories[request.param]()


def test_put_get_round_trip(store: MediaStore) -> None:
    media_id = new_media_id()
    store.put(media_id, b"\x89PNG...", "image/png", expires_at=NOW + 60)
    assert store.get(media_id, now=NOW) == (b"\x89PNG...", "image/png")


def test_unknown_id_is_none(store: MediaStore) -> None:
    assert store.get(new_media_id(), now=NOW) is None


def test_expiry_honoured_before_purge(store: MediaStore) -> None:
    media_id = new_media_id()
    store.put(media_id, b"data", "image/jpeg", expires_at=NOW + 10)
    assert store.get(media_id, now=NOW + 9.9) is not None
    assert store.get(media_id, now=NOW + 10) is None


def test_purge_removes_only_expired(store: MediaStore) -> None:
    old, fresh = new_media_id(), new_media_id()
    store.put(old, b"old", "image/png", expires_at=NOW - 1)
    store.put(fresh, b"fresh", "image/png", expires_at=NOW + 100)
    assert store.purge_expired(now=NOW) == 1
    assert store.purge_expired(now=NOW) == 0
    assert store.get(fresh, now=NOW) == (b"fresh", "image/png")
    assert store.get(old, now=NOW - 10) is None  # gone, not just hidden


def test_delete(store: MediaStore) -> None:
    media_id = new_media_id()
    store.put(media_id, b"x", "image/webp", expires_at=NOW + 60)
    store.delete(media_id)
    store.delete(media_id)  # idempotent
    assert store.get(media_id, now=NOW) is None


@pytest.mark.parametrize(
    "media_id", ["../../etc/passwd", "..", "a/b", "abc\\..\\def", "short", "", "x" * 200, "id.json"]
)
def test_ids_outside_the_charset_refused(store: MediaStore, media_id: str) -> None:
    with pytest.raises(ValueError):
        store.put(media_id, b"x", "image/png", expires_at=NOW + 60)
    assert store.get(media_id, now=NOW) is None
    store.delete(media_id)  # a no-op, not an escape


def test_new_media_ids_are_unguessable_and_url_safe() -> None:
    ids = {new_media_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", media_id) for media_id in ids)


def test_traversal_id_cannot_read_a_file_outside(tmp_path: Path) -> None:
    root = tmp_path / "media"
    store = LocalMediaStore(root)
    (tmp_path / "secret.bin").write_bytes(b"secret")
    (tmp_path / "secret.json").write_text('{"content_type": "x", "expires_at": 1e12}')
    assert store.get("../secret", now=NOW) is None


def test_local_store_is_shared_through_the_folder(tmp_path: Path) -> None:
    media_id = new_media_id()
    LocalMediaStore(tmp_path / "m").put(media_id, b"abc", "image/png", expires_at=NOW + 5)
    assert LocalMediaStore(tmp_path / "m").get(media_id, now=NOW) == (b"abc", "image/png")


def test_local_store_leaves_no_temp_files_and_purges_stale_ones(tmp_path: Path) -> None:
    root = tmp_path / "m"
    store = LocalMediaStore(root)
    media_id = new_media_id()
    store.put(media_id, b"abc", "image/png", expires_at=NOW + 5)
    names = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert names == [f"{media_id}.bin", f"{media_id}.json"]
    # leftovers of a writer that crashed an hour ago: a temp file and data without metadata
    folder = root / media_id[:2]
    stale_tmp = folder / ".tmp-crashed"
    orphan = folder / f"{new_media_id()}.bin"
    young_orphan = folder / f"{new_media_id()}.bin"
    for path in (stale_tmp, orphan, young_orphan):
        path.write_bytes(b"partial")
    for path in (stale_tmp, orphan):
        os.utime(path, (NOW - 7200, NOW - 7200))
    os.utime(young_orphan, (NOW - 10, NOW - 10))
    store.purge_expired(now=NOW)
    assert not stale_tmp.exists()
    assert not orphan.exists()
    assert young_orphan.exists()  # may be a put still in progress
    assert store.get(media_id, now=NOW) == (b"abc", "image/png")


def test_corrupt_metadata_reads_as_missing_and_is_purged(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path / "m")
    media_id = new_media_id()
    store.put(media_id, b"abc", "image/png", expires_at=NOW + 100)
    meta = tmp_path / "m" / media_id[:2] / f"{media_id}.json"
    meta.write_text("{not json")
    assert store.get(media_id, now=NOW) is None
    assert store.purge_expired(now=NOW) == 1
    assert not meta.with_suffix(".bin").exists()
