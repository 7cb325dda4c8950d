"""Endings a worker's claim makes on the way (a job given up after ``max_attempts``, one past
its start deadline) reach the process's endings handler at once, from the claim itself: the
job's stored inline inputs are deleted and waiters here are told, with no event-log reader
running anywhere in the test (on SQLite and on a real redis-server)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from qwenserve.catalog import validate_request
from qwenserve.jobs import Job, JobStatus
from qwenserve.media.inline import store_inline_images
from qwenserve.media.storage import LocalMediaStore
from qwenserve.notify.endings import Ending, Endings
from qwenserve.store.base import Store
from qwenserve.store.rules import GIVE_UP_KIND, START_TIMEOUT_KIND
from qwenserve.worker.runner import WorkerRunner
from tests.service.inprocess import open_test_store
from tests.service.test_worker import Clock, SolidEngine, enqueue, runner


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


def _with_stored_input(
    store: Store,
    media: LocalMediaStore,
    key_id: str,
    clock: Clock,
    job_id: str,
    start_by: float | None = None,
) -> tuple[Job, str]:
    """An edit job whose input the API stored in the media store (``media/inline.py``)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    body = {"prompt": "x", "image": base64.b64encode(buffer.getvalue()).decode(), "steps": 2}
    request, [media_id] = store_inline_images(
        validate_request("qwen-image-edit-fast", body),
        media,
        expires_at=time.time() + 3600,
        max_bytes=10**6,
        max_pixels=10**6,
    )
    job = enqueue(store, request, job_id, key_id, clock, start_by=start_by)  # type: ignore[arg-type]
    assert media.get(media_id, now=time.time()) is not None
    return job, media_id


def _watched(
    worker: WorkerRunner, store: Store, media: LocalMediaStore, clock: Clock
) -> tuple[list[Ending], list[str]]:
    """Give ``worker`` a shared endings handler (as ``serve`` does), and record what it and the
    worker's ``on_job_done`` see. No event-log reader exists: only a handover reaches it."""
    endings = Endings(store, media, clock=clock)
    seen: list[Ending] = []
    endings.subscribe(seen.append)
    worker.finisher.endings = endings
    done: list[str] = []
    worker.on_job_done = done.append
    return seen, done


def _status(store: Store, job: Job, clock: Clock) -> JobStatus:
    stored = store.get_job(job.id, now=clock())
    assert stored is not None
    return stored.status


def test_a_give_up_inside_a_workers_claim_deletes_the_jobs_inline_inputs_at_once(
    store: Store, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job, stored_input = _with_stored_input(store, media, key_id, clock, "job-doomed")
    for attempt in range(2):  # two workers claim it and die (the runner's max_attempts is 2)
        assert store.claim(f"victim-{attempt}", slugs=None, lease_s=30, max_attempts=2, now=clock())
        clock.now += 31
    engine = SolidEngine()
    worker = runner(store, media, engine, clock)  # type: ignore[arg-type]
    seen, done = _watched(worker, store, media, clock)
    assert worker.run_once() is False, "the claim gave the job up: nothing to run"
    assert _status(store, job, clock) is JobStatus.FAILED and engine.calls == 0
    assert media.get(stored_input, now=time.time()) is None, "deleted by the claim's handover"
    assert [(e.event.job_id, e.event.error_kind) for e in seen] == [(job.id, GIVE_UP_KIND)]
    assert seen[0].job is not None and seen[0].job.id == job.id
    assert done == [job.id]
    worker.close()


def test_a_start_deadline_missed_before_the_claim_deletes_the_inputs_at_once(
    store: Store, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    late, late_input = _with_stored_input(
        store, media, key_id, clock, "job-late", start_by=clock() + 5
    )
    on_time, on_time_input = _with_stored_input(store, media, key_id, clock, "job-on-time")
    worker = runner(store, media, SolidEngine(), clock)  # type: ignore[arg-type]
    seen, done = _watched(worker, store, media, clock)
    clock.now += 10
    assert worker.run_once() is True, "the job with no deadline still runs"
    worker.wait_finished()
    assert _status(store, late, clock) is JobStatus.FAILED
    assert _status(store, on_time, clock) is JobStatus.COMPLETED
    assert media.get(late_input, now=time.time()) is None
    assert media.get(on_time_input, now=time.time()) is None
    kinds = {e.event.job_id: e.event.error_kind for e in seen}
    assert kinds == {late.id: START_TIMEOUT_KIND, on_time.id: None}
    assert sorted(done) == sorted([late.id, on_time.id])
    worker.close()
