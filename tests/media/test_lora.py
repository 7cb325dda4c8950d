"""LoraFetcher: location forms, the content-addressed cache, validation and local folders."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path

import pytest

from qwenserve.errors import InvalidInput, InvalidRequest
from qwenserve.media.fetch import UrlFetcher
from qwenserve.media.lora import LoraCacheCounts, LoraFetcher, lora_fetch_url, validate_lora_file
from tests.media.loopback import LoopbackServer, body_route, make_image_bytes

numpy = pytest.importorskip("numpy")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _lora_bytes(keys: tuple[str, ...] = ("transformer.blocks.0.attn.lora_A.weight",)) -> bytes:
    tensors = {key: numpy.full((4, 2), i, dtype=numpy.float16) for i, key in enumerate(keys)}
    data: bytes = safetensors_numpy.save(tensors)
    return data


def _raw_safetensors(header: dict[str, object], data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _fetcher(cache: Path, *, max_bytes: int = 10 * 2**20, private: bool = True) -> LoraFetcher:
    return LoraFetcher(cache, fetcher=UrlFetcher(allow_private=private), max_bytes=max_bytes)


# --- location rewriting (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (
            "https://huggingface.co/lightx2v/Qwen-Image-Lightning/blob/main/a/b.safetensors",
            "https://huggingface.co/lightx2v/Qwen-Image-Lightning/resolve/main/a/b.safetensors",
        ),
        (
            "https://huggingface.co/o/n/blob/v1.0/x.safetensors?download=true",
            "https://huggingface.co/o/n/resolve/v1.0/x.safetensors?download=true",
        ),
        (
            "https://huggingface.co/datasets/o/n/blob/main/x.safetensors",
            "https://huggingface.co/datasets/o/n/resolve/main/x.safetensors",
        ),
        (
            "https://huggingface.co/o/n/resolve/main/x.safetensors",
            "https://huggingface.co/o/n/resolve/main/x.safetensors",
        ),
        (
            "https://example.com/o/n/blob/main/x.safetensors",
            "https://example.com/o/n/blob/main/x.safetensors",
        ),
        ("hf://o/n/x.safetensors", "https://huggingface.co/o/n/resolve/main/x.safetensors"),
        (
            "hf://o/n@abc123/dir/x.safetensors",
            "https://huggingface.co/o/n/resolve/abc123/dir/x.safetensors",
        ),
        (
            "hf://datasets/o/n/x y.safetensors",
            "https://huggingface.co/datasets/o/n/resolve/main/x%20y.safetensors",
        ),
    ],
)
def test_lora_fetch_url(location: str, expected: str) -> None:
    assert lora_fetch_url(location, field="lora_2_url") == expected


@pytest.mark.parametrize(
    "location", ["hf://onlyowner/file.safetensors", "hf://o/n@/x", "ftp://h/x", "s3://b/k"]
)
def test_bad_locations_refused(location: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        lora_fetch_url(location, field="lora_3_url")
    assert info.value.field == "lora_3_url"


# --- fetching and caching ------------------------------------------------------------------


def test_second_resolve_does_not_fetch_again(server: LoopbackServer, tmp_path: Path) -> None:
    body = _lora_bytes()
    server.routes["/style.safetensors"] = body_route(body)
    url = server.url("/style.safetensors")
    counts = LoraCacheCounts()
    first = _fetcher(tmp_path).resolve(url, field="lora_2_url", counts=counts)
    assert first.read_bytes() == body
    assert first.name == f"{hashlib.sha256(body).hexdigest()}.safetensors"
    again = _fetcher(tmp_path).resolve(url, field="lora_2_url", counts=counts)
    assert again == first  # a new process, too
    assert server.hits["/style.safetensors"] == 1
    assert (counts.misses, counts.hits) == (1, 1)  # what the worker's /metrics reports
    assert not any((tmp_path / "loras" / "tmp").iterdir())


def test_concurrent_resolves_fetch_once(server: LoopbackServer, tmp_path: Path) -> None:
    server.routes["/c.safetensors"] = body_route(_lora_bytes())
    fetcher = _fetcher(tmp_path)
    results: list[Path] = []

    def resolve() -> None:
        results.append(fetcher.resolve(server.url("/c.safetensors"), field="lora_2_url"))

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert server.hits["/c.safetensors"] == 1


def test_loopback_refused_without_allow_private(server: LoopbackServer, tmp_path: Path) -> None:
    server.routes["/x.safetensors"] = body_route(_lora_bytes())
    with pytest.raises(InvalidRequest, match="private"):
        _fetcher(tmp_path, private=False).resolve(server.url("/x.safetensors"), field="lora_2_url")
    assert server.total_hits == 0


def test_too_large_refused(server: LoopbackServer, tmp_path: Path) -> None:
    server.routes["/big.safetensors"] = body_route(_lora_bytes())
    with pytest.raises(InvalidInput, match="larger than"):
        _fetcher(tmp_path, max_bytes=50).resolve(server.url("/big.safetensors"), field="lora_2_url")


def _cached_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "loras").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (make_image_bytes("PNG"), "header"),
        (b"short", "too short"),
        (_lora_bytes(("unet.down.0.weight", "unet.up.1.bias")), "no LoRA weights"),
    ],
)
def test_non_lora_files_rejected_and_not_cached(
    server: LoopbackServer, tmp_path: Path, body: bytes, reason: str
) -> None:
    server.routes["/bad.safetensors"] = body_route(body)
    with pytest.raises(InvalidInput, match=reason) as info:
        _fetcher(tmp_path).resolve(server.url("/bad.safetensors"), field="lora_3_url")
    assert info.value.field == "lora_3_url"
    assert str(info.value).startswith("lora_3_url: ")
    assert _cached_files(tmp_path) == []


# --- header validation ---------------------------------------------------------------------

_GOOD_ENTRY = {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ({"x.lora_up.weight": _GOOD_ENTRY}, b"\0" * 8, None),
        ({"x.lora_up.weight": _GOOD_ENTRY}, b"\0" * 9, "file size"),
        ({"x.lora_up.weight": {**_GOOD_ENTRY, "dtype": "F128"}}, b"\0" * 8, "dtype"),
        ({"x.lora_up.weight": {**_GOOD_ENTRY, "shape": [2, 3]}}, b"\0" * 8, "shape"),
        ({"x.lora_up.weight": {**_GOOD_ENTRY, "shape": [-2, -2]}}, b"\0" * 8, "shape"),
        ({"x.lora_up.weight": {**_GOOD_ENTRY, "data_offsets": [8, 0]}}, b"\0" * 8, "offsets"),
        (
            {
                "a.lora_A.weight": _GOOD_ENTRY,
                "a.lora_B.weight": _GOOD_ENTRY,  # both claim the same bytes
            },
            b"\0" * 16,
            "overlap",
        ),
        ({"__metadata__": {"format": "pt"}}, b"", "no tensors"),
        ({"__metadata__": {"n": 1}, "x.lora_up.weight": _GOOD_ENTRY}, b"\0" * 8, "metadata"),
    ],
)
def test_validate_lora_file(
    tmp_path: Path, header: dict[str, object], data: bytes, reason: str | None
) -> None:
    path = tmp_path / "f.safetensors"
    path.write_bytes(_raw_safetensors(header, data))
    if reason is None:
        validate_lora_file(path, field="lora_2_url")
        return
    with pytest.raises(InvalidInput, match=reason):
        validate_lora_file(path, field="lora_2_url")


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InvalidInput, match="header length"):
        validate_lora_file(path, field="lora_2_url")


# --- local folders -------------------------------------------------------------------------


def test_local_paths_refused_when_not_enabled(tmp_path: Path) -> None:
    path = tmp_path / "mine.safetensors"
    path.write_bytes(_lora_bytes())
    with pytest.raises(InvalidRequest, match="local paths are not enabled"):
        _fetcher(tmp_path / "cache").resolve(str(path), field="lora_2_url")


def test_local_paths_inside_allowed_folders(tmp_path: Path) -> None:
    allowed = tmp_path / "loras"
    (allowed / "sub").mkdir(parents=True)
    target = allowed / "sub" / "mine.safetensors"
    target.write_bytes(_lora_bytes())
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_lora_bytes())
    (allowed / "escape.safetensors").symlink_to(outside)
    fetcher = LoraFetcher(
        tmp_path / "cache", fetcher=UrlFetcher(), max_bytes=2**20, local_dirs=[allowed]
    )
    assert fetcher.resolve(str(target), field="lora_2_url") == target.resolve()
    assert fetcher.resolve("sub/mine.safetensors", field="lora_2_url") == target.resolve()
    assert fetcher.resolve(f"file://{target}", field="lora_2_url") == target.resolve()
    for location in (
        str(outside),
        "../outside.safetensors",
        str(allowed / ".." / "outside.safetensors"),
        str(allowed / "escape.safetensors"),  # a symlink leading out
    ):
        with pytest.raises(InvalidRequest, match="outside the folders"):
            fetcher.resolve(location, field="lora_2_url")
    with pytest.raises(InvalidRequest, match="no such LoRA file"):
        fetcher.resolve(str(allowed / "missing.safetensors"), field="lora_2_url")


def test_local_file_is_validated(tmp_path: Path) -> None:
    allowed = tmp_path / "loras"
    allowed.mkdir()
    (allowed / "notes.txt").write_text("hello")
    fetcher = LoraFetcher(
        tmp_path / "cache", fetcher=UrlFetcher(), max_bytes=2**20, local_dirs=[allowed]
    )
    with pytest.raises(InvalidInput):
        fetcher.resolve("notes.txt", field="lora_2_url")
