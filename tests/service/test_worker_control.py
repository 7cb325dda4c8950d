"""Job control through the real runner and a real store: one heartbeat per worker carries the
leases and the progress, and a job its owner cancels stops at the next denoising step (alone)
or alone out of its batch (the batch goes on)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from qwenserve.catalog import GenerationRequest
from qwenserve.errors import InferenceError
from qwenserve.jobs import CANCELLED, Job, JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.store.sqlite import SqliteStore
from tests.service.test_worker import (
    Clock,
    Generated,
    NoInputs,
    SolidEngine,
    _submit_with_stored_input,
    balance,
    job_running_and_one_looked_ahead,
    runner,
    submit,
)

NEVER_S = 3600.0
"""A control period no test waits out: heartbeats happen when the test calls ``beat()`` (and
once when a batch starts)."""


class SteppingEngine(SolidEngine):
    """Denoises ``request.steps`` steps of ``step_s`` each, calling ``on_step`` and then
    ``should_cancel`` after every step as the real engine's step callback does (a cancel raises
    InferenceError("cancelled")). ``at_step(step)`` lets a test act between two steps."""

    def __init__(self, step_s: float = 0.0, at_step: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.step_s = step_s
        self.at_step = at_step
        self.started = threading.Event()
        self.finished = threading.Event()
        self.steps_run = 0
        self.cancelled_at: int | None = None

    def _denoise(
        self,
        steps: int,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> None:
        self.started.set()
        for step in range(1, steps + 1):
            if self.step_s:
                time.sleep(self.step_s)
            self.steps_run += 1
            if on_step is not None:
                on_step(step, steps)
            if self.at_step is not None:
                self.at_step(step)
            if should_cancel is not None and should_cancel():
                self.cancelled_at = step
                raise InferenceError("cancelled")
        self.finished.set()

    def generate(  # type: ignore[override]
        self,
        request: GenerationRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        **kwargs: object,
    ) -> Generated:
        self._denoise(request.steps, on_step, should_cancel)
        return SolidEngine.generate(self, request)

    def generate_batch(  # type: ignore[override]
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        **kwargs: object,
    ) -> list[Generated]:
        self.batch_sizes.append(len(requests))
        self._denoise(requests[0].steps, on_step, should_cancel)
        return [SolidEngine.generate(self, r) for r in requests]


class CountingStore:
    """The real store, counting the calls the runner makes (and what each heartbeat lists)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.heartbeats: list[set[str]] = []

    def heartbeat(self, worker_id: str, progress: Any, **kwargs: Any) -> Any:
        self.calls.append("heartbeat")
        self.heartbeats.append(set(progress))
        return self.inner.heartbeat(worker_id, progress, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attribute(*args, **kwargs)

        return counted


@pytest.fixture
def in_thread() -> Iterator[Callable[[Callable[[], object]], threading.Thread]]:
    threads: list[threading.Thread] = []

    def start(target: Callable[[], object]) -> threading.Thread:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        threads.append(thread)
        return thread

    yield start
    for thread in threads:
        thread.join(10)


def job_of(store: Any, job: Job, clock: Clock) -> Job:
    stored = store.get_job(job.id, now=clock())
    assert stored is not None
    return stored


def wait_until(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


# --- progress and the one heartbeat ---------------------------------------------------------
def test_progress_is_visible_in_the_store_within_a_second_while_the_job_runs(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str, in_thread: Any
) -> None:
    job = submit(store, key_id, clock, steps=16)
    engine = SteppingEngine(step_s=0.12)  # ~2 s of denoising
    worker = runner(store, media, engine, clock)  # lease 30 s: the default period, 1 s
    assert job_of(store, job, clock).progress is None
    in_thread(worker.run_once)
    assert engine.started.wait(10)
    started = time.monotonic()
    assert wait_until(lambda: (job_of(store, job, clock).progress or _NONE).step > 0, 1.5)
    seen = job_of(store, job, clock)
    assert time.monotonic() - started < 1.5 and not engine.finished.is_set()
    assert seen.status is JobStatus.PROCESSING and seen.progress is not None
    assert seen.progress.total_steps == 16 and 0 < seen.progress.step < 16
    assert seen.progress.updated_at == clock()
    worker.close()


class _NoProgress:
    step = 0


_NONE = _NoProgress()


def test_one_heartbeat_per_period_carries_every_job_whatever_the_steps(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    jobs = [submit(store, key_id, clock, seed=seed, steps=16) for seed in (1, 2, 3)]
    counting = CountingStore(store)
    engine = SteppingEngine(step_s=0.03)  # 3 jobs x 16 steps in ~0.5 s
    period_s = 0.1
    worker = runner(counting, media, engine, clock, control_period_s=period_s)  # type: ignore[arg-type]
    began = time.monotonic()
    assert worker.run_once()
    elapsed_s = time.monotonic() - began
    worker.wait_finished()
    worker.close()
    assert engine.batch_sizes == [3] and engine.steps_run == 16
    assert "renew_lease" not in counting.calls
    beats = counting.calls.count("heartbeat")
    # One per period (plus one when the batch starts), never one per job or per step.
    assert 1 <= beats <= elapsed_s / period_s + 2 < 3 * 16
    ids = {j.id for j in jobs}
    assert all(listed <= ids for listed in counting.heartbeats)
    assert max(len(listed) for listed in counting.heartbeats) == 3, "one call for all three"
    for job in jobs:
        assert job_of(store, job, clock).status is JobStatus.COMPLETED


def test_a_heartbeat_is_one_store_call_and_only_the_first_step_makes_one(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    for seed in (1, 2, 3):
        submit(store, key_id, clock, seed=seed, steps=16)
    counting = CountingStore(store)
    during: list[list[str]] = []

    def at_step(step: int) -> None:
        if step == 1:
            during.append(list(counting.calls))
        if step in (5, 10):
            worker.control.beat()  # what the control thread does once per period
        if step == 16:
            during.append(list(counting.calls))

    engine = SteppingEngine(at_step=at_step)
    worker = runner(counting, media, engine, clock, control_period_s=NEVER_S)  # type: ignore[arg-type]
    assert worker.run_once()
    worker.wait_finished()
    worker.close()
    first, last = during
    made = last[len(first) :]
    # Two beats during 16 steps of 3 jobs: exactly two store calls (the batch-start beat and
    # the first step's may land before the snapshot at step 1 or after it), each listing all
    # three jobs.
    assert [c for c in made if c != "heartbeat"] == []
    assert made.count("heartbeat") in (2, 3, 4)


def test_the_first_step_is_heartbeated_at_once_the_next_ones_with_the_period(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    """A watcher sees "denoising" (step 1) as soon as it begins: a job shorter than the period
    would otherwise show step 0, then its end."""
    job = submit(store, key_id, clock, steps=6)
    seen: dict[int, int | None] = {}

    def reported() -> int | None:
        progress = job_of(store, job, clock).progress
        return progress.step if progress is not None else None

    def at_step(step: int) -> None:
        if step == 1:
            wait_until(lambda: reported() == 1)
            seen[1] = reported()
        if step == 4:
            time.sleep(0.3)  # a period of NEVER_S: nothing sends steps 2-4
            seen[4] = reported()

    # 0.1 s per step: the start's own beat (step 0) lands before step 1 is made.
    engine = SteppingEngine(step_s=0.1, at_step=at_step)
    worker = runner(store, media, engine, clock, control_period_s=NEVER_S)
    assert worker.run_once()
    worker.wait_finished()
    worker.close()
    assert seen == {1: 1, 4: 1}


# --- cancel ---------------------------------------------------------------------------------
def test_cancelling_a_running_job_stops_it_at_the_next_step_and_refunds_once(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job, stored_input = _submit_with_stored_input(store, media, key_id, clock, "job-edit")
    assert balance(store, key_id) == pytest.approx(0.9)
    done: list[str] = []

    def at_step(step: int) -> None:
        if step == 1:
            store.cancel(job.id, key_id, now=clock())
            worker.control.beat()  # the next heartbeat says: cancelled

    engine = SteppingEngine(at_step=at_step)
    worker = runner(store, media, engine, clock, control_period_s=NEVER_S)
    worker.on_job_done = done.append
    assert worker.run_once()
    worker.wait_finished()
    assert engine.cancelled_at == 1 and engine.steps_run == 1, "stopped at the next step"
    ended = job_of(store, job, clock)
    assert ended.status is JobStatus.FAILED and ended.error_kind == CANCELLED
    assert ended.error == "cancelled by its owner" and ended.result is None
    assert balance(store, key_id) == pytest.approx(1.0), "refunded exactly once"
    assert media.get(stored_input, now=time.time()) is None, "its stored input is deleted"
    assert done == [job.id]
    worker.close()


def _batch_of_three(
    tmp_path: Path, name: str, clock: Clock, cancel_second: bool
) -> tuple[SqliteStore, LocalMediaStore, str, list[Job], SteppingEngine]:
    from qwenserve.accounts.keys import create_api_key

    store = SqliteStore(tmp_path / f"{name}.db")
    media = LocalMediaStore(tmp_path / f"{name}-media")
    _, key = create_api_key(store, name="t", credits_usd=1.0, rpm=0, now=clock())
    jobs = [submit(store, key.id, clock, seed=seed, steps=8) for seed in (11, 12, 13)]
    ended_while_running: list[JobStatus] = []

    def at_step(step: int) -> None:
        if cancel_second and step == 3:
            store.cancel(jobs[1].id, key.id, now=clock())
            worker.control.beat()
        if cancel_second and step == 8:  # the batch still runs: the cancelled job ended already
            wait_until(lambda: job_of(store, jobs[1], clock).status is JobStatus.FAILED)
            ended_while_running.append(job_of(store, jobs[1], clock).status)

    engine = SteppingEngine(at_step=at_step)
    worker = runner(store, media, engine, clock, control_period_s=NEVER_S, max_batch=3)
    assert worker.run_once()
    worker.wait_finished()
    worker.close()
    if cancel_second:
        assert ended_while_running == [JobStatus.FAILED]
    return store, media, key.id, jobs, engine


def test_cancelling_one_job_of_a_batch_ends_it_alone_and_the_others_complete(
    tmp_path: Path, clock: Clock
) -> None:
    store, media, key_id, jobs, engine = _batch_of_three(tmp_path, "cancel", clock, True)
    plain_store, plain_media, _, plain_jobs, _ = _batch_of_three(tmp_path, "plain", clock, False)
    assert engine.batch_sizes == [3] and engine.steps_run == 8 and engine.cancelled_at is None
    cancelled = job_of(store, jobs[1], clock)
    assert cancelled.status is JobStatus.FAILED and cancelled.error_kind == CANCELLED
    assert cancelled.result is None, "its image is discarded"
    assert balance(store, key_id) == pytest.approx(0.8), "two paid, the cancelled one refunded"
    for index in (0, 2):
        done = job_of(store, jobs[index], clock)
        plain = job_of(plain_store, plain_jobs[index], clock)
        assert done.status is JobStatus.COMPLETED and done.result and plain.result
        mine = media.get(done.result.media_id, now=clock())
        theirs = plain_media.get(plain.result.media_id, now=clock())
        assert mine is not None and theirs is not None and mine[0] == theirs[0]


def test_a_job_cancelled_while_its_inputs_load_is_never_run(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str, in_thread: Any
) -> None:
    job = submit(store, key_id, clock)
    loading, go_on = threading.Event(), threading.Event()

    class SlowInputs(NoInputs):
        def load_images(self, request: GenerationRequest) -> list[Image.Image]:
            loading.set()
            assert go_on.wait(10)
            return []

    engine = SteppingEngine()
    worker = runner(store, media, engine, clock, inputs=SlowInputs(), control_period_s=NEVER_S)
    thread = in_thread(worker.run_once)
    assert loading.wait(10)
    store.cancel(job.id, key_id, now=clock())
    worker.control.beat()
    # Not running yet: it ends at once, while its inputs still load.
    assert wait_until(lambda: job_of(store, job, clock).status is JobStatus.FAILED)
    go_on.set()
    thread.join(10)
    worker.wait_finished()
    assert engine.calls == 0 and not engine.started.is_set()
    assert job_of(store, job, clock).error_kind == CANCELLED
    assert balance(store, key_id) == pytest.approx(1.0)
    worker.close()


def test_a_looked_ahead_job_waits_without_progress_and_a_cancel_ends_it_unrun(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    ahead = job_running_and_one_looked_ahead(store, media, clock, key_id, forever=False)
    ahead.worker.control.beat()  # (the beat at the batch's start may still be on its way)
    assert wait_until(lambda: job_of(store, ahead.first, clock).progress is not None)
    first, second = job_of(store, ahead.first, clock), job_of(store, ahead.second, clock)
    assert first.status is JobStatus.PROCESSING and first.progress is not None, "denoising"
    assert second.status is JobStatus.PROCESSING and second.progress is None, "waiting"
    stats = store.stats(now=clock())
    assert stats.waiting_by_model == {"qwen-image-fast": 1}
    assert stats.processing_by_model == {"qwen-image-fast": 2}
    store.cancel(ahead.second.id, key_id, now=clock())
    ahead.worker.control.beat()
    assert wait_until(lambda: job_of(store, ahead.second, clock).status is JobStatus.FAILED)
    ahead.engine.gate.set()
    ahead.thread.join(10)
    ahead.worker.run_once()  # takes the looked-ahead batch: nothing in it may run
    ahead.worker.wait_finished()
    assert ahead.engine.seeds == [1]
    assert job_of(store, ahead.first, clock).status is JobStatus.COMPLETED
    assert job_of(store, ahead.second, clock).error_kind == CANCELLED
    assert balance(store, key_id) == pytest.approx(0.9)
    ahead.worker.close()


def test_a_job_lost_while_running_is_abandoned_not_reported(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock)

    def at_step(step: int) -> None:
        if step == 1:  # the lease ran out and another worker took the job
            for _ in range(3):  # (the beat at the batch's start may have renewed it once)
                clock.now += 31
                if store.claim("thief", slugs=None, lease_s=30, max_attempts=5, now=clock()):
                    break
            worker.control.beat()

    engine = SteppingEngine(at_step=at_step)
    worker = runner(store, media, engine, clock, control_period_s=NEVER_S)
    assert worker.run_once()
    worker.wait_finished()
    assert engine.cancelled_at == 1
    taken = job_of(store, job, clock)
    assert taken.status is JobStatus.PROCESSING and taken.worker_id == "thief"
    assert balance(store, key_id) == pytest.approx(0.9), "not refunded: it still runs"
    worker.close()


# --- the batch window on the injected clock -------------------------------------------------
def test_the_batch_window_waits_on_the_injected_clock(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    submit(store, key_id, clock, seed=1)
    slept: list[float] = []
    late: list[Job] = []

    def sleep(seconds: float) -> None:  # no real waiting: time moves when the runner waits
        slept.append(seconds)
        clock.now += seconds
        if len(slept) == 3 and not late:  # a batch-mate arrives during the window
            late.append(submit(store, key_id, clock, seed=2))

    engine = SolidEngine()
    worker = runner(store, media, engine, clock, sleep=sleep, batch_window_s=0.05, max_batch=4)
    began = time.monotonic()
    assert worker.run_once()
    assert engine.batch_sizes == [2], "the late batch-mate joined"
    assert sum(slept) == pytest.approx(0.05), "it waited out the window, on the clock"
    alone = submit(store, key_id, clock, seed=3)
    slept.clear()
    assert worker.run_once()
    worker.wait_finished()
    assert engine.batch_sizes == [2] and sum(slept) == pytest.approx(0.05)
    assert job_of(store, alone, clock).status is JobStatus.COMPLETED
    assert time.monotonic() - began < 5
    worker.close()


# --- the same control seam on Redis -----------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:

    from tests.redis_server import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer() as server:
        yield server.url


@pytest.mark.redis
def test_progress_and_cancel_through_a_real_redis_store(
    redis_url: str, media: LocalMediaStore, clock: Clock
) -> None:
    import uuid

    from qwenserve.accounts.keys import create_api_key
    from qwenserve.store.redis import RedisStore

    store = RedisStore.from_url(redis_url, namespace=f"t{uuid.uuid4().hex[:8]}")
    _, key = create_api_key(store, name="t", credits_usd=1.0, rpm=0, now=clock())
    job = submit(store, key.id, clock, steps=8)  # type: ignore[arg-type]
    seen: list[Any] = []

    def at_step(step: int) -> None:
        if step == 3:
            worker.control.beat()
            seen.append(job_of(store, job, clock).progress)
            store.cancel(job.id, key.id, now=clock())
            worker.control.beat()

    engine = SteppingEngine(at_step=at_step)
    worker = runner(store, media, engine, clock, control_period_s=NEVER_S)  # type: ignore[arg-type]
    assert worker.run_once()
    worker.wait_finished()
    worker.close()
    [progress] = seen
    assert progress is not None and (progress.step, progress.total_steps) == (3, 8)
    assert engine.cancelled_at == 3
    ended = job_of(store, job, clock)
    assert ended.status is JobStatus.FAILED and ended.error_kind == CANCELLED
    refunded = store.get_key(key.id)
    assert refunded is not None and refunded.balance_usd == pytest.approx(1.0)
    store.close()
