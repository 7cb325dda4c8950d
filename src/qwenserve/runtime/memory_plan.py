"""The memory plan: what to evict before a load, the byte budget, and when to tile the VAE decode.

Pure arithmetic over sizes the caller measured or estimated (no torch), so every decision is
tested with made-up numbers. A pipeline is a ``Footprint`` of ``Part``s; a part that carries a
``share_id`` (the content hash of its files) is one module for every pipeline holding that id,
so it is counted once. The rules:

- **Before a load**, least recently used pipelines are evicted until the count cap and the byte
  budget hold with the new pipeline in (its shared parts already loaded cost nothing). The entry
  in use is never evicted; a pipeline bigger than the budget alone is still loaded, alone.
- **The budget** is ``resident_memory_gb`` when set; else, on CUDA, what the pipelines hold now
  plus the device's free memory, less ``memory_margin_gb`` kept for the work itself
  (activations, workspaces); elsewhere only the count cap applies.
- **VAE tiling** follows the whole decode (batch x pixels): on CUDA when its estimated peak does
  not fit the free memory less the margin (and less what the call itself holds through the
  decode: Qwen-Image 2.1's prefix KV cache); elsewhere above a pixel count.
- **Qwen-Image 2.1's prefix KV cache** is per request: K and V of every block over the text and
  reference-image tokens, kept from the first step to the last (``prefix_kv_cache_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class DecodeBytesPerPixel:
    """Peak memory of an untiled VAE decode per output pixel, for one device type and one
    element width, and where the figure comes from."""

    bytes_per_pixel: int
    source: str
    """"measured: ..." (how, where) or "scaled: ..." (derived from another row, unmeasured)."""


VAE_DECODE_BYTES_PER_PIXEL: dict[tuple[str, int], DecodeBytesPerPixel] = {
    ("cpu", 4): DecodeBytesPerPixel(
        8 * 1024,
        "measured: a CPU, float32, 0.76 GB at 256², 2.36 GB at 512², ~8.1 KB per added pixel",
    ),
    ("cuda", 2): DecodeBytesPerPixel(
        4 * 1024,
        "scaled: the CPU float32 figure halved for 2-byte values (bfloat16/float16), not "
        "measured on a GPU; bench/gpu_verify.py's vae stage measures it (~7.2 GB for 1328²)",
    ),
}
"""Keyed by (device type, bytes per element of the VAE's dtype). A figure is per device and
per dtype width: allocator, kernels and workspaces differ between a CPU and a GPU, so a CPU
measurement is only a scaled guess for CUDA. Replace a "scaled" row by a measured one when the
proof measures it; a key not listed is scaled from the CPU float32 row by element width."""


def decode_bytes_per_pixel(device_type: str, dtype_bytes: int) -> DecodeBytesPerPixel:
    """The decode peak per output pixel on ``device_type`` with ``dtype_bytes``-wide values."""
    known = VAE_DECODE_BYTES_PER_PIXEL.get((device_type, dtype_bytes))
    if known is not None:
        return known
    cpu = VAE_DECODE_BYTES_PER_PIXEL[("cpu", 4)]
    return DecodeBytesPerPixel(
        cpu.bytes_per_pixel * dtype_bytes // 4,
        f"scaled: the CPU float32 figure for {dtype_bytes}-byte values on {device_type}",
    )


CPU_TILING_PIXELS = 2 * 1024 * 1024
"""Off CUDA (no free-memory reading that bounds the decode): tile when batch x pixels exceeds
this (about 2 MP, the former per-image threshold, now over the whole batch)."""


@dataclass(frozen=True)
class Part:
    """One component of a pipeline in memory (its weights' bytes).

    ``share_id``: the content hash of its files, for the components pipelines may share (text
    encoder, VAE); None means the part belongs to its pipeline alone.
    """

    name: str
    bytes: int
    share_id: str | None = None


@dataclass(frozen=True)
class Footprint:
    """What a pipeline holds (or would hold once loaded), part by part."""

    parts: tuple[Part, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(part.bytes for part in self.parts)

    def share_ids(self) -> set[str]:
        return {part.share_id for part in self.parts if part.share_id is not None}


def held_bytes(footprints: Iterable[Footprint]) -> int:
    """Bytes held by these pipelines together, each shared part counted once."""
    total = 0
    seen: set[str] = set()
    for footprint in footprints:
        for part in footprint.parts:
            if part.share_id is None:
                total += part.bytes
            elif part.share_id not in seen:
                seen.add(part.share_id)
                total += part.bytes
    return total


@dataclass(frozen=True)
class LoadPlan:
    """What ``plan_load`` decided for one new pipeline."""

    evict: tuple[str, ...]
    """Resident keys to free before the load, least recently used first."""
    shared: frozenset[str]
    """Share ids of the new pipeline's parts already loaded (reused, not loaded again)."""
    load_bytes: int
    """Bytes the load adds: the new footprint less its shared parts."""
    held_after: int
    """Bytes held once it is loaded (shared parts once)."""
    fits: bool
    """False when even alone it is over the budget (it is loaded anyway, alone)."""


def plan_load(
    new: Footprint,
    resident: Sequence[tuple[str, Footprint]],
    *,
    max_items: int,
    budget_bytes: int | None,
) -> LoadPlan:
    """Which of ``resident`` (key, footprint; least recently used first) to evict so ``new`` fits
    ``max_items`` pipelines and ``budget_bytes`` (None: no byte budget).

    A part of ``new`` whose share id a resident pipeline holds is reused: it stays loaded even
    when that pipeline is evicted, so it is never counted twice nor loaded again.
    """
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    loaded_ids = set().union(*(footprint.share_ids() for _key, footprint in resident))
    shared = frozenset(new.share_ids() & loaded_ids)
    load_bytes = sum(
        part.bytes for part in new.parts if part.share_id is None or part.share_id not in shared
    )
    kept = list(resident)
    evict: list[str] = []

    def over() -> bool:
        if len(kept) + 1 > max_items:
            return True
        if budget_bytes is None:
            return False
        return held_bytes([*(fp for _k, fp in kept), new]) > budget_bytes

    while kept and over():
        key, _footprint = kept.pop(0)
        evict.append(key)
    held_after = held_bytes([*(fp for _k, fp in kept), new])
    return LoadPlan(
        evict=tuple(evict),
        shared=shared,
        load_bytes=load_bytes,
        held_after=held_after,
        fits=budget_bytes is None or held_after <= budget_bytes,
    )


def plan_trim(
    resident: Sequence[tuple[str, Footprint]], *, newest: str, budget_bytes: int | None
) -> tuple[str, ...]:
    """After a load measured more than estimated: the least recently used keys (never
    ``newest``) to evict until ``resident`` fits ``budget_bytes``."""
    if budget_bytes is None:
        return ()
    kept = list(resident)
    evict: list[str] = []
    while held_bytes(fp for _k, fp in kept) > budget_bytes:
        victims = [key for key, _fp in kept if key != newest]
        if not victims:
            break
        evict.append(victims[0])
        kept = [(key, fp) for key, fp in kept if key != victims[0]]
    return tuple(evict)


@dataclass(frozen=True)
class MemoryBudget:
    """Where the byte limits come from: a fixed budget, or the device's free memory.

    ``free_bytes`` reads the device's free memory now (CUDA); None where no such reading bounds
    the work (CPU, MPS, CPU offload), so only a fixed budget or the count cap applies.
    """

    fixed_bytes: int | None
    margin_bytes: int
    free_bytes: Callable[[], int] | None = None

    @classmethod
    def from_gb(
        cls,
        resident_memory_gb: float | None,
        memory_margin_gb: float,
        free_bytes: Callable[[], int] | None,
    ) -> MemoryBudget:
        fixed = int(resident_memory_gb * GIB) if resident_memory_gb is not None else None
        return cls(fixed, int(memory_margin_gb * GIB), free_bytes)

    def for_residents(self, held: int) -> int | None:
        """Bytes resident pipelines may hold in all, given they hold ``held`` now; None: no
        byte budget (count cap only)."""
        if self.fixed_bytes is not None:
            return self.fixed_bytes
        if self.free_bytes is None:
            return None
        return max(self.free_bytes() + held - self.margin_bytes, 0)

    def for_work(self) -> int | None:
        """Bytes a call may use now (free less the margin); None where that is not measured."""
        if self.free_bytes is None:
            return None
        return self.free_bytes() - self.margin_bytes


def decode_peak_bytes(
    width: int, height: int, batch: int, dtype_bytes: int, device_type: str = "cuda"
) -> int:
    """Estimated peak memory of an untiled VAE decode of ``batch`` images of width x height."""
    per_pixel = decode_bytes_per_pixel(device_type, dtype_bytes).bytes_per_pixel
    return width * height * batch * per_pixel


def reference_tokens(reference_sizes: Sequence[tuple[int, int]], vae_factor: int = 16) -> int:
    """Latent tokens Qwen-Image 2.1 adds to the joint sequence for references of these (resized)
    sizes: one per ``vae_factor``² pixels (16x VAE, unpatched latents)."""
    return sum((w // vae_factor) * (h // vae_factor) for w, h in reference_sizes)


def prefix_kv_cache_bytes(
    *, layers: int, inner_dim: int, prefix_tokens: int, batch: int, dtype_bytes: int, cfg: bool
) -> int:
    """Qwen-Image 2.1's prefix KV cache for one call: K and V (``inner_dim`` each) in every one
    of ``layers`` blocks for ``prefix_tokens`` text and reference tokens, per sample, twice with
    CFG (a cache per branch). The real model (32 blocks x 4096, bf16) holds 512 KiB per prefix
    token: ~2 GiB per 1024² reference, ~20 GiB for ten."""
    branches = 2 if cfg else 1
    return 2 * layers * inner_dim * prefix_tokens * batch * dtype_bytes * branches


def wants_vae_tiling(
    forced: bool | None,
    *,
    width: int,
    height: int,
    batch: int,
    dtype_bytes: int,
    work_bytes: int | None,
    held_bytes: int = 0,
    device_type: str = "cuda",
) -> bool:
    """Whether the decode of ``batch`` images of width x height should be tiled.

    ``forced`` (``EngineConfig.vae_tiling``) wins. Else, with ``work_bytes`` (what a call may use
    now, ``MemoryBudget.for_work``): tile when the whole decode's estimated peak exceeds it less
    ``held_bytes`` (what the call allocates before the decode and still holds, such as 2.1's
    prefix KV cache), the peak from ``device_type``'s figure (``VAE_DECODE_BYTES_PER_PIXEL``);
    without (CPU): tile above ``CPU_TILING_PIXELS`` over batch x pixels.
    """
    if forced is not None:
        return forced
    if work_bytes is None:
        return width * height * batch > CPU_TILING_PIXELS
    peak = decode_peak_bytes(width, height, batch, dtype_bytes, device_type)
    return peak > work_bytes - held_bytes
