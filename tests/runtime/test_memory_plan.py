"""The memory plan with made-up sizes: what is evicted before a load, what is shared, the budget,
when the VAE decode is tiled; and footprints read from files (headers, the HF cache's blobs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qwenserve.runtime.footprint import ContentHashes, folder_footprint, hub_snapshot
from qwenserve.runtime.memory_plan import (
    GIB,
    VAE_DECODE_BYTES_PER_PIXEL,
    DecodeBytesPerPixel,
    Footprint,
    MemoryBudget,
    Part,
    held_bytes,
    plan_load,
    plan_trim,
    wants_vae_tiling,
)

TE = Part("text_encoder", 16 * GIB, "te-hash")
VAE = Part("vae", GIB // 4, "vae-hash")


def base(transformer_gib: int = 40, *, te: Part = TE, vae: Part = VAE) -> Footprint:
    return Footprint((Part("transformer", transformer_gib * GIB), te, vae))


def test_least_recently_used_are_evicted_before_the_load_until_it_fits() -> None:
    own_te = Part("text_encoder", 16 * GIB, "other-te")
    resident = [("a", base(te=own_te)), ("b", base(te=Part("text_encoder", 16 * GIB, "b-te")))]
    plan = plan_load(base(), resident, max_items=4, budget_bytes=120 * GIB)
    assert plan.evict == ("a",)  # a and b hold 112.25 GiB (one VAE); the new one adds 56
    assert plan.fits and plan.held_after <= 120 * GIB
    assert plan_load(base(), resident, max_items=4, budget_bytes=200 * GIB).evict == ()


def test_the_count_cap_still_applies_without_a_byte_budget() -> None:
    resident = [("a", Footprint()), ("b", Footprint())]
    assert plan_load(Footprint(), resident, max_items=2, budget_bytes=None).evict == ("a",)


def test_shared_parts_are_not_counted_again_and_survive_their_holders_eviction() -> None:
    resident = [("a", base())]
    plan = plan_load(base(transformer_gib=41), resident, max_items=4, budget_bytes=100 * GIB)
    # Same text encoder and VAE: only the transformer is new, and both fit in 97.25 GiB.
    assert plan.shared == {"te-hash", "vae-hash"}
    assert plan.load_bytes == 41 * GIB
    assert plan.evict == () and plan.held_after == 97 * GIB + GIB // 4
    # A budget for one: a goes, but its text encoder and VAE stay for the new pipeline.
    tight = plan_load(base(transformer_gib=41), resident, max_items=4, budget_bytes=60 * GIB)
    assert tight.evict == ("a",) and tight.shared == {"te-hash", "vae-hash"}
    assert tight.held_after == 57 * GIB + GIB // 4


def test_differing_files_share_nothing() -> None:
    other = base(te=Part("text_encoder", 16 * GIB, "another-te"))
    plan = plan_load(other, [("a", base())], max_items=4, budget_bytes=None)
    assert plan.shared == {"vae-hash"}
    assert plan.load_bytes == 56 * GIB
    assert held_bytes([base(), other]) == 2 * 56 * GIB + GIB // 4


def test_a_pipeline_over_the_budget_alone_evicts_everything_and_loads_alone() -> None:
    plan = plan_load(base(), [("a", base(te=Part("t", 1, None)))], max_items=4, budget_bytes=GIB)
    assert plan.evict == ("a",) and not plan.fits


def test_after_a_load_measured_bigger_the_oldest_go_but_never_the_new_one() -> None:
    resident = [("a", Footprint((Part("x", 50),))), ("b", Footprint((Part("x", 60),)))]
    assert plan_trim(resident, newest="b", budget_bytes=100) == ("a",)
    assert plan_trim(resident, newest="b", budget_bytes=10) == ("a",)
    assert plan_trim(resident, newest="b", budget_bytes=None) == ()


def test_cuda_default_budget_is_free_plus_held_less_the_margin() -> None:
    free = 60 * GIB
    budget = MemoryBudget.from_gb(None, 8.0, lambda: free)
    assert budget.for_residents(held=56 * GIB) == 108 * GIB
    assert budget.for_work() == 52 * GIB
    # What the pipelines hold and what is free move together: loading one changes nothing.
    free -= 41 * GIB
    assert budget.for_residents(held=97 * GIB) == 108 * GIB
    # RESIDENT_MEMORY_GB overrides it; off CUDA there is only the count cap.
    assert MemoryBudget.from_gb(20.0, 8.0, lambda: free).for_residents(held=0) == 20 * GIB
    assert MemoryBudget.from_gb(None, 8.0, None).for_residents(held=0) is None


def test_cuda_default_budget_evicts_before_a_load_on_a_141_gib_card() -> None:
    held = 56 * GIB  # one base resident
    budget = MemoryBudget.from_gb(None, 8.0, lambda: 141 * GIB - held)
    resident = [("a", base(te=Part("text_encoder", 16 * GIB, "a-te")))]
    second = plan_load(base(), resident, max_items=4, budget_bytes=budget.for_residents(held))
    assert second.evict == ()  # 56.25 + 56.25 GiB fit in 133
    held += 56 * GIB
    resident.append(("b", base()))
    third = plan_load(
        base(te=Part("text_encoder", 16 * GIB, "c-te")),
        resident,
        max_items=4,
        budget_bytes=budget.for_residents(held),
    )
    assert third.evict == ("a",)


def test_vae_tiling_follows_batch_times_pixels_on_a_cpu() -> None:
    def tiled(width: int, batch: int) -> bool:
        return wants_vae_tiling(
            None, width=width, height=width, batch=batch, dtype_bytes=4, work_bytes=None
        )

    assert not tiled(1024, 2)  # exactly 2 MP
    assert tiled(1024, 3)  # each image is 1 MP: the old per-image rule never tiled this
    assert tiled(1536, 1)


def test_vae_tiling_follows_the_whole_decode_and_free_memory_on_cuda() -> None:
    def tiled(batch: int, work_gib: float, forced: bool | None = None) -> bool:
        return wants_vae_tiling(
            forced,
            width=1328,
            height=1328,
            batch=batch,
            dtype_bytes=2,
            work_bytes=int(work_gib * GIB),
        )

    assert not tiled(1, 10)  # ~6.7 GiB for one 1328² image in bf16
    assert tiled(4, 10)  # ~27 GiB for four
    assert not tiled(4, 40)
    assert tiled(1, 5)  # one image, little free memory (the old rule: never below 2 MP)
    assert not tiled(4, 5, forced=False) and tiled(1, 40, forced=True)


def test_the_decode_figure_is_per_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the CPU float32 row is a measurement; CUDA's is labelled as scaled from it.
    assert VAE_DECODE_BYTES_PER_PIXEL[("cpu", 4)].source.startswith("measured")
    assert VAE_DECODE_BYTES_PER_PIXEL[("cuda", 2)].source.startswith("scaled")
    one = {"width": 1024, "height": 1024, "batch": 1, "dtype_bytes": 2}
    assert not wants_vae_tiling(None, **one, work_bytes=5 * GIB)  # 4 GiB at 4 KiB/px
    # A figure measured on the GPU (the proof's vae stage) is the one the decision uses.
    measured = DecodeBytesPerPixel(6 * 1024, "measured: an H100, bfloat16")
    monkeypatch.setitem(VAE_DECODE_BYTES_PER_PIXEL, ("cuda", 2), measured)
    assert wants_vae_tiling(None, **one, work_bytes=5 * GIB)  # 6 GiB
    # ... and only for its own device: another device type keeps the scaled figure.
    assert not wants_vae_tiling(None, **one, work_bytes=5 * GIB, device_type="mps")


def _safetensors(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path))


def _pipeline_folder(root: Path, te_values: float) -> Path:
    index = {
        "_class_name": "QwenImagePipeline",
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
    }
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    weights = np.full((1000, 10), 1.0, dtype=np.float32)
    _safetensors(root / "transformer" / "diffusion_pytorch_model.safetensors", w=weights)
    te = np.full((100, 10), te_values, dtype=np.float32)
    _safetensors(root / "text_encoder" / "model.safetensors", w=te, ids=np.zeros(8, np.int64))
    (root / "text_encoder" / "config.json").write_text("{}")
    _safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", w=weights[:50])
    (root / "tokenizer").mkdir()
    return root


def test_footprint_from_headers_at_the_load_dtype(tmp_path: Path) -> None:
    folder = _pipeline_folder(tmp_path / "p", te_values=1.0)
    parts = {p.name: p for p in folder_footprint(folder, 2, None).parts}
    assert set(parts) == {"text_encoder", "transformer", "vae"}  # no weights, no part
    assert parts["transformer"].bytes == 10_000 * 2  # float32 on disk, loaded as bfloat16
    assert parts["text_encoder"].bytes == 1000 * 2 + 8 * 8  # integer tensors keep their size
    assert folder_footprint(folder, None, None).parts[1].bytes == 10_000 * 4


def test_folder_content_ids_decide_sharing_and_are_cached(tmp_path: Path) -> None:
    hashes = ContentHashes(tmp_path / "cache" / "hashes.json")
    a = folder_footprint(_pipeline_folder(tmp_path / "a", 1.0), 2, hashes)
    b = folder_footprint(_pipeline_folder(tmp_path / "b", 1.0), 2, hashes)
    c = folder_footprint(_pipeline_folder(tmp_path / "c", 2.0), 2, hashes)
    assert a.share_ids() == b.share_ids()  # identical text encoder and VAE files
    assert len(a.share_ids() & c.share_ids()) == 1  # only the VAE: c's encoder differs
    assert all(p.share_id is None for p in a.parts if p.name == "transformer")
    stored = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert str((tmp_path / "a" / "vae" / "diffusion_pytorch_model.safetensors").resolve()) in stored
    # A file changed in place gets a new hash (size and mtime key the cache).
    te = tmp_path / "b" / "text_encoder" / "model.safetensors"
    _safetensors(te, w=np.full((100, 10), 3.0, np.float32), ids=np.zeros(8, np.int64))
    os.utime(te, ns=(1, 1))
    again = ContentHashes(tmp_path / "cache" / "hashes.json")
    assert folder_footprint(tmp_path / "b", 2, again).share_ids() != a.share_ids()


def _hub_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache entry as huggingface_hub lays it out: snapshot links to blobs."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / "abc123" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_hub_cache_blob_names_are_the_content_ids(tmp_path: Path) -> None:
    source = _pipeline_folder(tmp_path / "src", 1.0)
    files = {str(f.relative_to(source)): f.read_bytes() for f in source.rglob("*") if f.is_file()}
    cache = tmp_path / "hub"
    _hub_repo(cache, "Qwen/Qwen-Image", files)
    vae = "vae/diffusion_pytorch_model.safetensors"
    _hub_repo(cache, "Qwen/Qwen-Image-Edit", {**files, vae: files[vae][:-1] + b"\x01"})
    assert hub_snapshot("Qwen/Nowhere", cache) is None
    first = hub_snapshot("Qwen/Qwen-Image", cache)
    second = hub_snapshot("Qwen/Qwen-Image-Edit", cache)
    assert first is not None and second is not None
    never_written = ContentHashes(None)  # blob names are used as they are: nothing is hashed
    a = folder_footprint(first, 2, never_written)
    b = folder_footprint(second, 2, never_written)
    te_a, te_b = (next(p for p in f.parts if p.name == "text_encoder") for f in (a, b))
    assert te_a.share_id == te_b.share_id and te_a.bytes == 1000 * 2 + 64
    vae_a, vae_b = (next(p for p in f.parts if p.name == "vae") for f in (a, b))
    assert vae_a.share_id != vae_b.share_id


def test_the_margin_setting_reaches_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenserve.cli.compose import engine_config
    from qwenserve.config import Settings

    assert engine_config(Settings(data_dir=tmp_path)).memory_margin_gb == 8.0
    monkeypatch.setenv("QWENSERVE_MEMORY_MARGIN_GB", "3.5")
    monkeypatch.setenv("QWENSERVE_RESIDENT_MEMORY_GB", "100")
    config = engine_config(Settings(data_dir=tmp_path))
    assert (config.memory_margin_gb, config.resident_memory_gb) == (3.5, 100.0)
