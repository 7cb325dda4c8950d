"""How much memory a base pipeline takes: estimated from its files before it loads, measured once
it has. No torch import: headers are JSON, tensors are counted by duck typing.

Before a load, sizes come from safetensors headers (the dtype and shape of every tensor; no
weight is read), with floating tensors counted at the dtype the engine loads them in. The
components pipelines may share (``SHAREABLE``) also get a content id: the hash of their weight
and config files, from the Hugging Face cache's blob names (a snapshot file is a link to
``blobs/<hash>``, the sha256 of an LFS file's content) or, for plain folders, sha256 computed once
and kept in ``ContentHashes``' file keyed by (real path, size, mtime_ns).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from qwenserve.runtime.memory_plan import Footprint, Part

SHAREABLE = ("text_encoder", "vae")
"""Components identical files make one module for several pipelines. Never the transformer:
LoRAs, fusing, quantisation and compilation change it per pipeline."""

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_CAST_ON_LOAD = {"F64", "F32", "F16", "BF16"}  # from_pretrained(dtype=...) casts these
_MAX_HEADER_BYTES = 100 * 2**20
_STANDARD_STEMS = ("diffusion_pytorch_model", "model")


def safetensors_bytes(path: Path, load_dtype_bytes: int | None = None) -> int:
    """Bytes of the tensors in a safetensors file, from its header alone; floating tensors at
    ``load_dtype_bytes`` each when given (the dtype they are loaded in)."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header of {length} bytes)")
        header = json.loads(file.read(length))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        each = (
            load_dtype_bytes
            if load_dtype_bytes is not None and dtype in _CAST_ON_LOAD
            else _DTYPE_BYTES.get(dtype, 4)
        )
        total += math.prod(info["shape"]) * each
    return total


def weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads in a component folder: the standard name's
    shards (by its index) or single file; else every safetensors file, else ``*.bin``."""
    for stem in _STANDARD_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = json.loads(index.read_text())["weight_map"].values()
            return sorted({folder / shard for shard in shards})
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


class ContentHashes:
    """sha256 of files, each computed once per (real path, size, mtime_ns), kept in ``path``.

    Files in a Hugging Face cache are named by their hash already (``blobs/<hash>``) and are
    never read. A lost update (two processes writing at once) only means a hash is computed again.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list[Any]] | None = None

    def digest(self, file: Path) -> str:
        real = file.resolve()
        if real.parent.name == "blobs":
            return real.name
        stat = real.stat()
        entries = self._load()
        known = entries.get(str(real))
        if known is not None and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            return str(known[2])
        digest = hashlib.sha256()
        with real.open("rb") as stream:
            for block in iter(lambda: stream.read(2**20), b""):
                digest.update(block)
        entries[str(real)] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        self._save(entries)
        return digest.hexdigest()

    def _load(self) -> dict[str, list[Any]]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None and self.path.is_file():
                with contextlib.suppress(OSError, ValueError):  # damaged: recomputed
                    self._entries = dict(json.loads(self.path.read_text()))
        return self._entries

    def _save(self, entries: dict[str, list[Any]]) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            staging.write_text(json.dumps(entries))
            os.replace(staging, self.path)
        except OSError:
            pass  # a read-only cache dir: hashes are recomputed next time, nothing breaks


def component_content_id(
    folder: Path, declared: object, files: list[Path], hashes: ContentHashes
) -> str:
    """One id for a component's weights and configs (and its declared class): equal ids mean
    ``from_pretrained`` builds equal modules from them."""
    digest = hashlib.sha256(json.dumps(declared).encode())
    for file in sorted({*files, *folder.glob("*.json")}):
        digest.update(f"{file.relative_to(folder)}\0{hashes.digest(file)}\n".encode())
    return digest.hexdigest()


def folder_footprint(
    root: Path, load_dtype_bytes: int | None, hashes: ContentHashes | None
) -> Footprint:
    """The estimated footprint of the diffusers pipeline folder ``root`` (``model_index.json``
    and a folder per component). With ``hashes``, the ``SHAREABLE`` parts carry content ids."""
    index = json.loads((root / "model_index.json").read_text())
    parts = []
    for name, declared in sorted(index.items()):
        if name.startswith("_") or not isinstance(declared, list) or declared[0] is None:
            continue
        folder = root / name
        files = weight_files(folder) if folder.is_dir() else []
        if not files:
            continue  # a scheduler, tokenizer or processor: no weights
        size = sum(
            safetensors_bytes(f, load_dtype_bytes)
            if f.suffix == ".safetensors"
            else f.stat().st_size
            for f in files
        )
        share_id = None
        if hashes is not None and name in SHAREABLE:
            share_id = component_content_id(folder, declared, files, hashes)
        parts.append(Part(name, size, share_id))
    return Footprint(tuple(parts))


def hub_snapshot(repo_id: str, hub_cache: Path | None = None) -> Path | None:
    """The local snapshot folder of ``repo_id``'s main revision in the Hugging Face cache; None
    when it has not been downloaded (no network is used)."""
    if hub_cache is None:
        from huggingface_hub import constants

        hub_cache = Path(constants.HF_HUB_CACHE)
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if (snapshot / "model_index.json").is_file() else None


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor really holds. A wrapper subclass (torchao's float8 weights report
    bfloat16 and 2 bytes per element) is counted by the inner tensors it flattens to."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _context = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return int(tensor.numel()) * int(tensor.element_size())


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers (tied ones once), quantized ones at their
    real size."""
    return sum(tensor_bytes(t) for t in itertools.chain(module.parameters(), module.buffers()))


def pipeline_footprint(pipe: Any, share_ids: dict[str, str]) -> Footprint:
    """The measured footprint of a loaded pipeline; ``share_ids`` names its shared parts."""
    parts = [
        Part(name, module_bytes(component), share_ids.get(name))
        for name, component in pipe.components.items()
        if hasattr(component, "parameters") and hasattr(component, "buffers")
    ]
    return Footprint(tuple(parts))
