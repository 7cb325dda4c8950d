"""Out of memory end to end on the tiny preset: a real engine whose transformer runs out of memory
for batches (and for a large size) behind the real worker runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwenserve.accounts.keys import create_api_key
from qwenserve.errors import OutOfMemory
from qwenserve.jobs import Job, JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.store.sqlite import SqliteStore
from tests.runtime.conftest import make_request, pixels
from tests.service.test_worker import Clock, enqueue, runner

SMALL = 256
LARGE = 384  # the tiny preset generates explicit sizes up to 384² as asked


def _request(seed: int, side: int = SMALL) -> Any:
    return make_request("qwen-image-2512", prompt="a", steps=2, seed=seed, width=side, height=side)


REFUSED: list[tuple[int, int]] = []
"""(batch, tokens) of each transformer call the fixture refused."""


@pytest.fixture(scope="module")
def tight_engine(shared_cache: Path) -> Engine:
    """Its transformer fits one 256² image at a time: more raises CUDA's out-of-memory error."""
    engine = Engine(EngineConfig(cache_dir=shared_cache, resident_models=1))
    transformer = engine.prepare_call(_request(1)).pipeline.transformer
    tokens_256 = (SMALL // 16) ** 2

    def out_of_memory(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        latents = kwargs["hidden_states"]
        if latents.shape[0] > 1 or latents.shape[1] > tokens_256:
            REFUSED.append((latents.shape[0], latents.shape[1]))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    transformer.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    return engine


def test_the_engine_names_size_and_batch(tight_engine: Engine) -> None:
    batch = [_request(1), _request(2), _request(3)]
    with pytest.raises(OutOfMemory, match="out of memory generating 256x256 ×3"):
        tight_engine.generate_batch(batch)
    assert tight_engine.generate(_request(1)).image.size == (SMALL, SMALL)


def test_a_batch_of_three_completes_through_the_worker(
    tight_engine: Engine, tmp_path: Path
) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "jobs.db")
    media = LocalMediaStore(tmp_path / "media")
    _, key = create_api_key(store, name="t", credits_usd=1.0, rpm=0, now=clock())

    def submit(job_id: str, side: int, seed: int) -> Job:
        return enqueue(store, _request(seed, side), job_id, key.id, clock)

    def status(job: Job) -> tuple[JobStatus, str]:
        stored = store.get_job(job.id, now=clock())
        assert stored is not None
        return stored.status, stored.error or ""

    worker = runner(store, media, tight_engine, clock, max_batch=4)  # type: ignore[arg-type]
    batch = [submit(f"b{seed}", SMALL, seed) for seed in (1, 2, 3)]
    REFUSED.clear()
    assert worker.run_once()
    worker.wait_finished()
    assert [status(job)[0] for job in batch] == [JobStatus.COMPLETED] * 3
    assert [b for b, _tokens in REFUSED] == [3, 2]  # 3 → 1 + 2 → 1 + 1 + 1

    large = submit("large", LARGE, 4)
    after = submit("after", SMALL, 5)
    assert worker.run_once() and worker.run_once()
    worker.wait_finished()
    large_status, error = status(large)
    assert large_status is JobStatus.FAILED and "384x384" in error
    assert status(after)[0] is JobStatus.COMPLETED


TILE_LATENT = 256 // 8
"""diffusers' default VAE tile (256 px) in latent pixels: a decoder input no larger is a tile."""


@pytest.fixture(scope="module")
def tight_vae_engine(shared_cache: Path) -> tuple[Engine, list[tuple[int, int]], list[int]]:
    """Its VAE runs out of memory decoding more than one tile (and, once tiled, more than one
    image) at once: (engine, (batch, latent side) of each decoder call that ran, transformer
    calls)."""
    engine = Engine(EngineConfig(cache_dir=shared_cache, resident_models=1))
    pipe = engine.prepare_call(_request(1, LARGE)).pipeline
    decoded: list[tuple[int, int]] = []
    denoised: list[int] = []

    def out_of_memory(_module: Any, args: tuple[Any, ...]) -> None:
        batch, side = args[0].shape[0], max(args[0].shape[-2:])
        if side > TILE_LATENT or (batch > 1 and pipe.vae.use_tiling):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        decoded.append((batch, side))

    pipe.vae.decoder.register_forward_pre_hook(out_of_memory)
    pipe.transformer.register_forward_hook(lambda *_: denoised.append(1))
    return engine, decoded, denoised


def test_a_decode_out_of_memory_is_retried_tiled_on_the_same_latents(
    tight_vae_engine: tuple[Engine, list[tuple[int, int]], list[int]],
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tight, decoded, denoised = tight_vae_engine
    tight.generate(_request(7, SMALL))  # one tile: its decode fits
    calls = len(denoised)  # transformer calls of one call whose decode fits
    decoded.clear()
    denoised.clear()
    result = tight.generate(_request(7, LARGE))
    assert result.image.size == (LARGE, LARGE)
    assert len(denoised) == calls and calls >= 2  # the denoising loop ran once
    assert decoded and all(side <= TILE_LATENT for _batch, side in decoded)  # tiles only
    # The image of those latents: the untiled decode's up to tile blending.
    untiled = engine.generate(_request(7, LARGE)).image
    assert np.abs(pixels(result.image) - pixels(untiled)).mean() <= 2.0
    assert "retrying it tiled" in caplog.text
    assert not tight.prepare_call(_request(1, LARGE)).pipeline.vae.use_slicing  # restored

    # A batch of two: tiled still does not fit, so the decode also goes one image at a time.
    decoded.clear()
    denoised.clear()
    batch = tight.generate_batch([_request(8, LARGE), _request(9, LARGE)])
    assert [r.image.size for r in batch] == [(LARGE, LARGE)] * 2
    assert "retrying it tiled+sliced" in caplog.text
    assert decoded and all(b == 1 and side <= TILE_LATENT for b, side in decoded)
    assert len(denoised) == calls  # one batched denoise, never repeated
