"""Fetching client-named LoRA files (``lora_2_url``, ``lora_3_url``) into a local cache.

A location is an http(s) URL, a Hugging Face location (a ``/blob/`` page URL or
``hf://{owner}/{name}[@rev]/{path}``, both rewritten to the ``/resolve/`` download URL) or, only
when the operator enabled folders for it, a local path inside one of them.

Fetched files are content-addressed: ``<cache_dir>/loras/<sha256>.safetensors``, with an index
``<cache_dir>/loras/index/<sha256 of the URL>.json`` mapping each URL to its file, so a URL is
downloaded once. Every step that makes something visible is an atomic rename, so concurrent
resolves (threads or processes) at worst download the same file twice, never expose half of
one. A URL naming a moving revision (``main``) is pinned to what it served the first time.

Files are validated as safetensors holding LoRA weights before they enter the cache: the
runtime loads them with ``safetensors``, and a malformed header should be a client error here
rather than a crash in the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from qwenserve.errors import InvalidInput, InvalidRequest
from qwenserve.media.fetch import UrlFetcher

_HF_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
_REPO_KINDS = frozenset({"datasets", "spaces"})
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def lora_fetch_url(location: str, *, field: str) -> str:
    """The http(s) URL to download for a LoRA ``location`` (Hugging Face forms rewritten).

    Raises InvalidRequest for a malformed ``hf://`` location or another scheme.
    """
    text = location.strip()
    lowered = text[:8].lower()
    if lowered.startswith("hf://"):
        return _hf_scheme_url(text[len("hf://") :], field=field)
    if not lowered.startswith(("http://", "https://")):
        raise InvalidRequest(
            f"{field}: must be an http(s) URL or hf://owner/name/path.safetensors", field=field
        )
    parts = urllib.parse.urlsplit(text)
    if (parts.hostname or "").lower() not in _HF_HOSTS:
        return text
    segments = parts.path.split("/")  # ['', owner, name, 'blob', rev, ...]
    verb_at = 4 if len(segments) > 1 and segments[1] in _REPO_KINDS else 3
    if len(segments) > verb_at + 2 and segments[verb_at] in ("blob", "raw"):
        # /blob/ is the HTML page and /raw/ the LFS pointer; /resolve/ is the file itself.
        segments[verb_at] = "resolve"
        return urllib.parse.urlunsplit(parts._replace(path="/".join(segments)))
    return text


def _hf_scheme_url(rest: str, *, field: str) -> str:
    segments = rest.split("/")
    prefix = ""
    if segments and segments[0] in _REPO_KINDS:
        prefix = segments.pop(0) + "/"
    if len(segments) < 3 or not all(segments):
        raise InvalidRequest(
            f"{field}: an hf:// location is hf://owner/name[@revision]/path/to/file", field=field
        )
    owner, name, *path = segments
    name, _at, revision = name.partition("@")
    if not name or (_at and not revision):
        raise InvalidRequest(
            f"{field}: the hf:// location has an empty name or revision", field=field
        )
    quoted_path = "/".join(urllib.parse.quote(part) for part in path)
    quoted_rev = urllib.parse.quote(revision or "main", safe="")
    return f"https://huggingface.co/{prefix}{owner}/{name}/resolve/{quoted_rev}/{quoted_path}"


def validate_lora_file(path: Path, *, field: str) -> None:
    """Check that ``path`` is a well-formed safetensors file with at least one LoRA tensor.

    Reads only the header: an 8-byte little-endian length, then that many bytes of JSON that
    must fit in the file, describing tensors of known dtypes whose offsets tile the data
    section exactly. Raises InvalidInput naming ``field``.
    """
    try:
        _check_safetensors(path)
    except _Malformed as exc:
        raise InvalidInput(
            f"{field}: not a usable safetensors LoRA file ({exc})", field=field
        ) from exc


class _Malformed(Exception):
    """Why a file is not a safetensors LoRA; becomes an InvalidInput naming the field."""


def _check_safetensors(path: Path) -> None:
    file_bytes = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _Malformed("too short")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes < 2 or header_bytes > min(_MAX_HEADER_BYTES, file_bytes - 8):
            raise _Malformed("header length does not fit the file")
        raw_header = handle.read(header_bytes)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Malformed("header is not JSON") from exc
    if not isinstance(header, dict):
        raise _Malformed("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _Malformed("__metadata__ must map names to strings")
    if not header:
        raise _Malformed("no tensors")
    data_bytes = file_bytes - 8 - header_bytes
    spans = sorted(_tensor_span(key, entry) for key, entry in header.items())
    position = 0
    for begin, end in spans:
        if begin != position:
            raise _Malformed("tensor data offsets overlap or leave gaps")
        position = end
    if position != data_bytes:
        raise _Malformed("tensor data does not match the file size")
    if not any("lora" in key.lower() for key in header):
        raise _Malformed("no LoRA weights: no tensor name contains 'lora'")


def _tensor_span(key: str, entry: object) -> tuple[int, int]:
    """The [begin, end) byte span of one tensor, after checking dtype, shape and size agree."""
    if not isinstance(entry, dict):
        raise _Malformed(f"tensor {key!r} is not described by an object")
    bits = _DTYPE_BITS.get(str(entry.get("dtype")))
    if bits is None:
        raise _Malformed(f"tensor {key!r} has an unknown dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _Malformed(f"tensor {key!r} has an invalid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _Malformed(f"tensor {key!r} has invalid data offsets")
    begin, end = offsets
    elements = 1
    for n in shape:
        elements *= n
    if begin > end or (elements * bits) % 8 or (end - begin) != elements * bits // 8:
        raise _Malformed(f"tensor {key!r} has offsets that do not match its shape and dtype")
    return begin, end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class LoraCacheCounts:
    """Cache hits and misses of ``LoraFetcher.resolve`` for one worker (its /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def record(self, *, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1


class LoraFetcher:
    """Fetches lora_2_url/lora_3_url once into a content-addressed cache and validates it.

    ``max_bytes`` bounds a download; ``local_dirs`` are the folders a location may name a file
    in (none: local paths are refused). Thread-safe; a URL in flight is fetched by one thread.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        fetcher: UrlFetcher,
        max_bytes: int,
        local_dirs: Sequence[Path] = (),
    ) -> None:
        self.fetcher = fetcher
        self.max_bytes = max_bytes
        self.local_dirs = tuple(Path(d).resolve() for d in local_dirs)
        self._files_dir = cache_dir / "loras"
        self._index_dir = self._files_dir / "index"
        self._tmp_dir = self._files_dir / "tmp"
        for folder in (self._files_dir, self._index_dir, self._tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def resolve(self, location: str, *, field: str, counts: LoraCacheCounts | None = None) -> Path:
        """A local path to a validated LoRA file for ``location``, downloading it when needed;
        a URL found in the cache or downloaded is a hit or a miss in ``counts``.

        Raises InvalidRequest (unsupported or refused location, local paths not enabled or
        outside the allowed folders), InvalidInput (not a safetensors LoRA file, too large)
        and whatever the fetcher raises (UpstreamError, UpstreamTimeout), naming ``field``.
        """
        text = location.strip()
        if not text:
            raise InvalidRequest(f"{field}: must not be empty", field=field)
        head = text[:8].lower()
        if "://" not in text[:16] or head.startswith("file://"):
            return self._resolve_local(text, field=field)
        url = lora_fetch_url(text, field=field)
        key = hashlib.sha256(url.encode("utf-8")).hexdigest()
        with self._lock_for(key):
            cached = self._cached(key)
            if counts is not None:
                counts.record(hit=cached is not None)
            if cached is not None:
                return cached
            return self._download(url, key, field=field)

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _cached(self, key: str) -> Path | None:
        try:
            entry = json.loads((self._index_dir / f"{key}.json").read_text("utf-8"))
            sha = str(entry["sha256"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        if not _SHA256_RE.match(sha):
            return None
        path = self._files_dir / f"{sha}.safetensors"
        return path if path.is_file() else None

    def _download(self, url: str, key: str, *, field: str) -> Path:
        tmp = self._tmp_dir / f"{key[:16]}-{secrets.token_hex(8)}.part"
        try:
            sha = self.fetcher.fetch_to_file(url, tmp, field=field, max_bytes=self.max_bytes)
            validate_lora_file(tmp, field=field)
            final = self._files_dir / f"{sha}.safetensors"
            os.replace(tmp, final)  # same bytes, same name: a concurrent writer is harmless
        finally:
            tmp.unlink(missing_ok=True)
        index_tmp = self._tmp_dir / f"{key[:16]}-{secrets.token_hex(8)}.json"
        index_tmp.write_text(json.dumps({"url": url, "sha256": sha}), "utf-8")
        os.replace(index_tmp, self._index_dir / f"{key}.json")
        return final

    def _resolve_local(self, text: str, *, field: str) -> Path:
        if not self.local_dirs:
            raise InvalidRequest(
                f"{field}: local paths are not enabled on this server; "
                "send an http(s) or hf:// URL",
                field=field,
            )
        raw = urllib.parse.unquote(text[len("file://") :]) if text.startswith("file://") else text
        given = Path(raw)
        candidates = [given] if given.is_absolute() else [d / given for d in self.local_dirs]
        inside = False
        for candidate in candidates:
            real = candidate.resolve()  # follows symlinks, so a link cannot lead outside
            if not any(real.is_relative_to(folder) for folder in self.local_dirs):
                continue
            inside = True
            if real.is_file():
                validate_lora_file(real, field=field)
                return real
        if not inside:
            raise InvalidRequest(
                f"{field}: the local path is outside the folders LoRA files may be read from",
                field=field,
            )
        raise InvalidRequest(f"{field}: no such LoRA file in the allowed folders", field=field)
