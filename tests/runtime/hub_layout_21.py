"""Qwen-Image 2.1 and 2.1-Turbo repos as published, tiny inside, and a Hugging Face cache of them.

``build_hub_pipeline_21(root, repo)`` writes ``<root>/<repo>``: the transformer and the Qwen3-VL
text encoder sharded with their index files, the VAE, ``processor/`` and ``scheduler/``, and a
``model_index.json`` in the published shape: the stock class names and, for Turbo, its fixed
``sample_sigmas`` grid (terminal sigma excluded) beside the components. The models are the tiny
preset's (same seeds, same weights): Turbo's text encoder and VAE files are 2.1's byte for byte,
as published, and its transformer is its own.

``cache_snapshot(hub_cache, repo, folder)`` lays a folder out as ``huggingface_hub`` leaves a
download: ``blobs/<sha256>`` holding the bytes, ``snapshots/<revision>/<path>`` linking to them,
``refs/main`` naming the revision. Everything is built locally: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from qwenserve.catalog import PipelineKind
from qwenserve.runtime.processor import restore_stock_class_names
from qwenserve.runtime.progress import quiet_progress
from qwenserve.runtime.tiny_preset import build_tiny_pipeline

SHARD_SIZE = "100KB"
"""Small enough that the tiny transformer and text encoder each get several shards."""

PUBLISHED_DIFFUSERS_VERSION = "0.42.0.dev0"
"""What a repo's ``model_index.json`` names (the files were written by a diffusers build)."""

REVISION = "2b1e0c7d" * 5
"""The commit a snapshot is filed under (any 40 hex digits)."""


def build_hub_pipeline_21(root: Path, repo: str) -> Path:
    """``<root>/<repo>`` in the published layout, holding the tiny preset's ``repo`` models."""
    folder = root / repo
    if folder.exists():
        shutil.rmtree(folder)
    pipe = build_tiny_pipeline(PipelineKind.QWEN_IMAGE_21, repo)
    with quiet_progress():
        pipe.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    restore_stock_class_names(folder)
    index_path = folder / "model_index.json"
    index: dict[str, Any] = json.loads(index_path.read_text())
    index["_diffusers_version"] = PUBLISHED_DIFFUSERS_VERSION
    if index.get("sample_sigmas") is None:
        index.pop("sample_sigmas", None)  # the base publishes no grid: its steps choose one
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return folder


def cache_snapshot(hub_cache: Path, repo: str, folder: Path) -> Path:
    """``folder``'s files as the Hugging Face cache holds ``repo`` after a download; returns
    the snapshot folder."""
    base = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / REVISION
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = base / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(REVISION)
    return snapshot
