"""A job runs at the size admission fixed: the worker hands the engine the job's typed request,
and the runtime plans from ``request.size``, never from the request's ratio or width/height
fields again (catalog/sizes.py)."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

from PIL import Image

from qwenserve.catalog import GenerationRequest, OutputSize, SizeKind
from qwenserve.jobs import Job, JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.runtime import Engine
from qwenserve.store.base import ApiKey
from qwenserve.store.sqlite import SqliteStore
from qwenserve.worker.config import WorkerConfig
from qwenserve.worker.runner import WorkerRunner
from tests.runtime.conftest import make_request


class TextOnly:
    """Inputs of a text-to-image job: none to fetch."""

    def load_images(self, request: GenerationRequest) -> list[Image.Image]:
        return []

    def load_loras(self, request: GenerationRequest) -> list[Path]:
        return []


def _queued(store: SqliteStore, request: GenerationRequest, job_id: str, now: float) -> Job:
    job = Job(
        id=job_id,
        key_id="k",
        request=request,
        status=JobStatus.QUEUED,
        created_at=now,
        expires_at=now + 3600,
        cost_usd=0.0,
    )
    store.submit(job, rpm=0, now=now)
    return job


def test_a_job_runs_at_the_size_fixed_at_admission(engine: Engine, tmp_path: Path) -> None:
    now = time.time()
    store = SqliteStore(tmp_path / "state.db")
    media = LocalMediaStore(tmp_path / "media")
    store.create_key(ApiKey(id="k", key_hash="h" * 64, name="k", balance_usd=1.0, rpm=0))
    wide = make_request("qwen-image-fast", prompt="a kite", steps=2, seed=1, aspect_ratio="16:9")
    assert wide.size == OutputSize(SizeKind.RATIO, 1664 * 928, 1664, 928)
    # Admission fixed a portrait size for this one; its ratio field still says 16:9.
    portrait = dataclasses.replace(wide, size=OutputSize(SizeKind.RATIO, 928 * 1664, 928, 1664))
    jobs = [_queued(store, portrait, "portrait", now), _queued(store, wide, "wide", now)]
    worker = WorkerRunner(
        store=store,
        media=media,
        engine=engine,
        inputs=TextOnly(),
        config=WorkerConfig(worker_id="w1", lease_s=60.0, max_batch=4, poll_interval_s=0.01),
    )
    try:
        while worker.run_once():
            worker.wait_finished()
        sizes = {}
        for job in jobs:
            done = store.get_job(job.id, now=time.time())
            assert done is not None and done.status is JobStatus.COMPLETED, done
            assert done.size == job.size  # the stored job kept what admission fixed
            result = done.result
            assert result is not None
            stored = media.get(result.media_id, now=time.time())
            assert stored is not None
            assert Image.open(io.BytesIO(stored[0])).size == (result.width, result.height)
            sizes[job.id] = (result.width, result.height)
    finally:
        worker.close()
        store.close()
    # The tiny preset makes each fixed size at ~256² pixels, at the fixed size's ratio.
    assert sizes["wide"] == (336, 192)
    assert sizes["portrait"] == (192, 336), "the fixed size, not the 16:9 field"
