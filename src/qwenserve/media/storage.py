"""Where generated images live until their results expire.

A ``MediaStore`` keeps bytes and a content type under an unguessable id, with an expiry time.
``LocalMediaStore`` keeps them as files under one folder (shared by every process on the host);
``MemoryMediaStore`` keeps them in a dict, for tests and single-process use.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_DATA_SUFFIX = ".bin"
_META_SUFFIX = ".json"
_TMP_PREFIX = ".tmp-"
# Leftovers of a crashed writer (temp files, data without its metadata) are removed by purge
# once this old; younger ones may belong to a put that is still running.
_STALE_AFTER_S = 3600.0


def new_media_id() -> str:
    """A fresh unguessable, URL-safe media id (192 random bits)."""
    return secrets.token_urlsafe(24)


def is_valid_media_id(media_id: str) -> bool:
    """True for ids a store accepts: URL-safe characters only, so never a path."""
    return bool(_ID_RE.match(media_id))


class MediaStore(Protocol):
    """Bytes by id with an expiry. ``now`` is passed in so callers (and tests) own the clock."""

    def put(self, media_id: str, data: bytes, content_type: str, *, expires_at: float) -> None:
        """Store ``data`` under ``media_id`` until ``expires_at`` (Unix seconds).

        Raises ValueError for an id outside the id charset.
        """
        ...

    def get(self, media_id: str, *, now: float) -> tuple[bytes, str] | None:
        """The bytes and content type, or None when unknown, malformed or expired at ``now``."""
        ...

    def delete(self, media_id: str) -> None:
        """Forget ``media_id``; a no-op when it is unknown."""
        ...

    def purge_expired(self, *, now: float) -> int:
        """Delete everything expired at ``now``; returns how many items were removed."""
        ...


class MediaConfigError(Exception):
    """The configured media store cannot be used (bad URL, refused credentials, no bucket):
    ``serve`` and ``worker`` refuse to start with this one-line reason."""


@runtime_checkable
class PresigningMediaStore(MediaStore, Protocol):
    """A store that can hand out direct, expiring URLs (S3): ``QWENSERVE_MEDIA_URLS=presigned``
    redirects ``GET /media/{id}`` there instead of proxying the bytes."""

    def presigned_url(self, media_id: str, *, now: float) -> str | None:
        """A URL valid until the item expires; None when unknown, missing or expired."""
        ...


def _check_id(media_id: str) -> None:
    if not is_valid_media_id(media_id):
        raise ValueError(f"invalid media id {media_id!r}")


class LocalMediaStore:
    """Media as files: ``<root>/<id[:2]>/<id>.bin`` plus ``<id>.json`` (content type, expiry).

    Each file is written to a temp file in the same folder and renamed into place, and the
    metadata is renamed last, so a reader sees either nothing or the complete item. Safe for
    several threads and processes sharing the folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, media_id: str) -> tuple[Path, Path]:
        folder = self.root / media_id[:2]
        return folder / f"{media_id}{_DATA_SUFFIX}", folder / f"{media_id}{_META_SUFFIX}"

    def put(self, media_id: str, data: bytes, content_type: str, *, expires_at: float) -> None:
        _check_id(media_id)
        data_path, meta_path = self._paths(media_id)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"content_type": content_type, "expires_at": expires_at})
        _write_atomic(data_path, data)
        _write_atomic(meta_path, meta.encode("utf-8"))

    def get(self, media_id: str, *, now: float) -> tuple[bytes, str] | None:
        if not is_valid_media_id(media_id):
            return None
        data_path, meta_path = self._paths(media_id)
        meta = _read_meta(meta_path)
        if meta is None or meta[1] <= now:
            return None
        try:
            data = data_path.read_bytes()
        except FileNotFoundError:
            return None  # deleted between the two reads
        return data, meta[0]

    def delete(self, media_id: str) -> None:
        if not is_valid_media_id(media_id):
            return
        data_path, meta_path = self._paths(media_id)
        # Metadata first: without it the item is already invisible to get().
        meta_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)

    def purge_expired(self, *, now: float) -> int:
        removed = 0
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith(_TMP_PREFIX):
                    if _older_than(path, now - _STALE_AFTER_S):
                        path.unlink(missing_ok=True)
                    continue
                if path.suffix == _META_SUFFIX:
                    meta = _read_meta(path)
                    if meta is None or meta[1] <= now:
                        # Metadata first, as in delete(): get() stops seeing it at once.
                        path.unlink(missing_ok=True)
                        path.with_suffix(_DATA_SUFFIX).unlink(missing_ok=True)
                        removed += 1
                elif (
                    path.suffix == _DATA_SUFFIX
                    and not path.with_suffix(_META_SUFFIX).exists()
                    and _older_than(path, now - _STALE_AFTER_S)
                ):
                    path.unlink(missing_ok=True)  # a put that crashed before its metadata
        return removed


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _read_meta(path: Path) -> tuple[str, float] | None:
    try:
        raw = json.loads(path.read_text("utf-8"))
        return str(raw["content_type"]), float(raw["expires_at"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # unreadable metadata counts as expired, so purge removes it


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


class MemoryMediaStore:
    """Media in a dict: for tests and single-process setups. Thread-safe."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[bytes, str, float]] = {}
        self._lock = threading.Lock()

    def put(self, media_id: str, data: bytes, content_type: str, *, expires_at: float) -> None:
        _check_id(media_id)
        with self._lock:
            self._items[media_id] = (bytes(data), content_type, expires_at)

    def get(self, media_id: str, *, now: float) -> tuple[bytes, str] | None:
        with self._lock:
            item = self._items.get(media_id)
        if item is None or item[2] <= now:
            return None
        return item[0], item[1]

    def delete(self, media_id: str) -> None:
        with self._lock:
            self._items.pop(media_id, None)

    def purge_expired(self, *, now: float) -> int:
        with self._lock:
            expired = [key for key, item in self._items.items() if item[2] <= now]
            for key in expired:
                del self._items[key]
        return len(expired)
