"""The worker runner against a real SQLite store, with an engine fixture per failure mode."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from qwenserve.catalog import GenerationRequest, validate_request
from qwenserve.errors import InvalidInput, UpstreamError
from qwenserve.jobs import Job, JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.store.sqlite import SqliteStore
from qwenserve.store.workers import SqliteWorkerRegistry, WorkerInfo
from qwenserve.worker.config import WorkerConfig
from qwenserve.worker.runner import WorkerRunner


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Generated:
    image: Image.Image
    seed: int
    width: int
    height: int
    inference_time_s: float


class SolidEngine:
    """Paints the seed into a solid image: cheap and deterministic."""

    def __init__(self) -> None:
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.loaded = False

    def batch_key(self, request: GenerationRequest) -> object:
        return (request.slug, request.steps)

    def generate_batch(
        self, requests: Sequence[GenerationRequest], **kwargs: object
    ) -> list[Generated]:
        self.batch_sizes.append(len(requests))
        return [self.generate(r) for r in requests]

    def resident(self) -> list[str]:
        return ["Qwen/Qwen-Image"] if self.loaded else []

    def generate(
        self,
        request: GenerationRequest,
        *,
        images: Sequence[Image.Image] = (),
        extra_loras: Sequence[Path] = (),
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Generated:
        self.calls += 1
        self.loaded = True
        shade = request.seed % 256
        return Generated(Image.new("RGB", (32, 16), (shade, 0, 0)), request.seed, 32, 16, 0.01)


class RaisingEngine(SolidEngine):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def generate(self, request: GenerationRequest, **kwargs: object) -> Generated:  # type: ignore[override]
        self.calls += 1
        raise self.error


class HangingEngine(SolidEngine):
    """Runs 'steps' until told to cancel (as the real engine does through its step callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def generate(self, request: GenerationRequest, **kwargs: object) -> Generated:  # type: ignore[override]
        should_cancel = kwargs.get("should_cancel")
        self.started.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if callable(should_cancel) and should_cancel():
                from qwenserve.errors import InferenceError

                raise InferenceError("cancelled")
            time.sleep(0.01)
        raise AssertionError("never cancelled")


class NoInputs:
    def load_images(self, request: GenerationRequest) -> list[Image.Image]:
        return []

    def load_loras(self, request: GenerationRequest) -> list[Path]:
        return []


class FailingInputs(NoInputs):
    def load_images(self, request: GenerationRequest) -> list[Image.Image]:
        raise UpstreamError("image: the server answered 500", field="image")


def submit(
    store: SqliteStore,
    key_id: str,
    clock: Clock,
    seed: int = 7,
    cost: float = 0.1,
    steps: int = 2,
    start_by: float | None = None,
) -> Job:
    request = validate_request("qwen-image-fast", {"prompt": "x", "steps": steps, "seed": seed})
    return enqueue(store, request, f"job-{seed}", key_id, clock, cost, start_by)


def enqueue(
    store: SqliteStore,
    request: GenerationRequest,
    job_id: str,
    key_id: str,
    clock: Clock,
    cost: float = 0.1,
    start_by: float | None = None,
) -> Job:
    job = Job(
        id=job_id,
        key_id=key_id,
        request=request,
        status=JobStatus.QUEUED,
        created_at=clock(),
        expires_at=clock() + 3600,
        cost_usd=cost,
        start_by=start_by,
    )
    store.submit(job, rpm=0, now=clock())
    return job


def runner(
    store: SqliteStore,
    media: LocalMediaStore,
    engine: SolidEngine,
    clock: Clock,
    worker_id: str = "w1",
    inputs: NoInputs | None = None,
    registry: SqliteWorkerRegistry | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **config: float,
) -> WorkerRunner:
    return WorkerRunner(
        store=store,
        media=media,
        engine=engine,
        inputs=inputs or NoInputs(),
        config=WorkerConfig(
            worker_id=worker_id,
            lease_s=config.get("lease_s", 30.0),
            max_attempts=2,
            max_batch=int(config.get("max_batch", 4)),
            batch_window_s=config.get("batch_window_s", 0.0),
            control_period_s=config.get("control_period_s"),
            prefetch=bool(config.get("prefetch", False)),
            poll_interval_s=0.01,
        ),
        clock=clock,
        sleep=sleep,
        registry=registry,
    )


def balance(store: SqliteStore, key_id: str) -> float:
    key = store.get_key(key_id)
    assert key is not None
    return key.balance_usd


def test_completes_and_stores_media(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock)
    done: list[str] = []
    worker = runner(store, media, SolidEngine(), clock)
    worker.on_job_done = done.append
    assert worker.run_once() is True
    worker.wait_finished()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.COMPLETED
    assert stored.result is not None and stored.result.seed == 7
    data = media.get(stored.result.media_id, now=clock())
    assert data is not None and data[1] == "image/png"
    assert done == [job.id]
    assert worker.run_once() is False
    assert balance(store, key_id) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("error", "kind", "needle"),
    [
        (
            RuntimeError("CUDA error: device-side assert at 0xdeadbeef"),
            "InferenceError",
            "internal error",
        ),
        (
            RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
            "InferenceError",
            "out of memory",
        ),
        (
            InvalidInput("lora_2_url: not a LoRA for this model", field="lora_2_url"),
            "InvalidInput",
            "lora_2_url",
        ),
    ],
)
def test_engine_errors_fail_the_job_and_refund(
    store: SqliteStore,
    media: LocalMediaStore,
    clock: Clock,
    key_id: str,
    error: Exception,
    kind: str,
    needle: str,
) -> None:
    job = submit(store, key_id, clock)
    runner(store, media, RaisingEngine(error), clock).run_once()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.FAILED
    assert stored.error_kind == kind and needle in (stored.error or "")
    assert "0xdeadbeef" not in (stored.error or ""), "no internals leak to clients"
    assert balance(store, key_id) == pytest.approx(1.0)


def test_input_fetch_failure_keeps_its_kind(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock)
    runner(store, media, SolidEngine(), clock, inputs=FailingInputs()).run_once()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.error_kind == "UpstreamError"


def test_dead_worker_job_is_retaken_and_completed_once(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock)
    # Worker A claims the job and dies (never reports back).
    [claimed] = store.claim("dead", slugs=None, lease_s=30, max_attempts=2, now=clock())
    survivor = runner(store, media, SolidEngine(), clock, worker_id="alive")
    assert survivor.run_once() is False, "the lease still holds"
    clock.now += 31
    assert survivor.run_once() is True
    survivor.wait_finished()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.COMPLETED and stored.attempts == 2
    # The presumed-dead worker wakes up and tries to complete: refused, nothing changes.
    assert stored.result is not None
    assert not store.complete(claimed.id, "dead", stored.result, now=clock())
    assert balance(store, key_id) == pytest.approx(0.9)


def test_job_that_keeps_killing_workers_fails_with_reason(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock)
    for attempt in range(2):
        assert store.claim(f"victim-{attempt}", slugs=None, lease_s=30, max_attempts=2, now=clock())
        clock.now += 31
    engine = SolidEngine()
    runner(store, media, engine, clock).run_once()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.FAILED
    assert "2" in (stored.error or "") and engine.calls == 0
    assert balance(store, key_id) == pytest.approx(1.0)


def test_shutdown_cancel_returns_job_to_queue(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock)
    engine = HangingEngine()
    worker = runner(store, media, engine, clock)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert engine.started.wait(10)
    worker.cancel_current()
    thread.join(10)
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.QUEUED
    assert balance(store, key_id) == pytest.approx(0.9), "still paid for: it will run"
    second = runner(store, media, SolidEngine(), clock, worker_id="w2")
    second.run_once()
    second.wait_finished()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.COMPLETED


def test_batches_same_shape_jobs_and_returns_the_rest(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    jobs = []
    for seed in range(6):
        jobs.append(submit(store, key_id, clock, seed=seed, steps=3 if seed == 3 else 2))
        clock.now += 1
    engine = SolidEngine()
    worker = runner(store, media, engine, clock, max_batch=4)
    assert worker.run_once()
    worker.wait_finished()
    # Jobs 0, 1, 2 share a shape; job 3 (other steps) went back and keeps its place.
    assert engine.batch_sizes == [3]
    states = {j.id: store.get_job(j.id, now=clock()) for j in jobs}
    done = [j.id for j in jobs if states[j.id].status is JobStatus.COMPLETED]  # type: ignore[union-attr]
    assert done == [jobs[0].id, jobs[1].id, jobs[2].id]
    back = states[jobs[3].id]
    assert back is not None and back.status is JobStatus.QUEUED and back.attempts == 0
    # Each job got its own seed's pixels.
    for job in jobs[:3]:
        result = states[job.id].result  # type: ignore[union-attr]
        assert result is not None and result.seed == job.request.seed
    assert worker.run_once()
    worker.wait_finished()
    assert engine.batch_sizes == [3], "job 3 ran alone"
    assert store.get_job(jobs[3].id, now=clock()).status is JobStatus.COMPLETED  # type: ignore[union-attr]
    assert worker.run_once()
    worker.wait_finished()
    assert engine.batch_sizes == [3, 2]


def test_batching_off_runs_one_at_a_time(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    for seed in range(3):
        submit(store, key_id, clock, seed=seed)
    engine = SolidEngine()
    worker = runner(store, media, engine, clock, max_batch=1)
    while worker.run_once():
        pass
    worker.wait_finished()
    assert engine.calls == 3 and engine.batch_sizes == []


class GatedEngine(SolidEngine):
    """Each generate call waits until the test opens the gate (a long denoising run)."""

    def __init__(self) -> None:
        super().__init__()
        self.running = threading.Event()
        self.gate = threading.Event()
        self.seeds: list[int] = []

    def generate(self, request: GenerationRequest, **kwargs: object) -> Generated:  # type: ignore[override]
        self.seeds.append(request.seed)
        self.running.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return super().generate(request)


class RecordingInputs(NoInputs):
    """Notes which jobs had their inputs loaded (by seed), and signals each load."""

    def __init__(self) -> None:
        self.loaded: list[int] = []
        self.any_loaded = threading.Event()

    def load_images(self, request: GenerationRequest) -> list[Image.Image]:
        self.loaded.append(request.seed)
        self.any_loaded.set()
        return []


def status_of(store: SqliteStore, job: Job, clock: Clock) -> JobStatus:
    stored = store.get_job(job.id, now=clock())
    assert stored is not None
    return stored.status


@dataclass
class LookAhead:
    """Job 1 running (held at the gate) in a worker thread; job 2 looked ahead meanwhile."""

    worker: WorkerRunner
    engine: GatedEngine
    inputs: RecordingInputs
    thread: threading.Thread
    first: Job
    second: Job


def job_running_and_one_looked_ahead(
    store: SqliteStore,
    media: LocalMediaStore,
    clock: Clock,
    key_id: str,
    *,
    forever: bool,
    second_start_by: float | None = None,
) -> LookAhead:
    first = submit(store, key_id, clock, seed=1)
    engine, inputs = GatedEngine(), RecordingInputs()
    worker = runner(store, media, engine, clock, inputs=inputs, prefetch=True, max_batch=1)
    thread = threading.Thread(target=worker.run_forever if forever else worker.run_once)
    thread.start()
    assert engine.running.wait(10)
    inputs.any_loaded.clear()
    second = submit(store, key_id, clock, seed=2, start_by=second_start_by)
    worker.wake()
    assert inputs.any_loaded.wait(10), "the next job's inputs load during the first job"
    return LookAhead(worker, engine, inputs, thread, first, second)


def test_prefetch_claims_and_loads_the_next_job_while_one_runs(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    ahead = job_running_and_one_looked_ahead(store, media, clock, key_id, forever=False)
    worker, engine, inputs, thread = ahead.worker, ahead.engine, ahead.inputs, ahead.thread
    first, second = ahead.first, ahead.second
    assert inputs.loaded == [1, 2] and engine.seeds == [1]
    assert status_of(store, second, clock) is JobStatus.PROCESSING
    engine.gate.set()
    thread.join(10)
    assert worker.run_once() is True, "the looked-ahead job runs next"
    worker.wait_finished()
    assert engine.seeds == [1, 2] and inputs.loaded == [1, 2], "inputs were not loaded twice"
    for job in (first, second):
        assert status_of(store, job, clock) is JobStatus.COMPLETED
    worker.close()


def test_prefetch_leaves_a_job_to_an_idle_peer(
    tmp_path: Path, store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    registry = SqliteWorkerRegistry(tmp_path / "registry.db")
    idle_peer = WorkerInfo("peer", "h", ("qwen-image-fast",), (), None, clock(), clock())
    registry.announce(idle_peer, ttl_s=1e6)
    submit(store, key_id, clock, seed=1)
    engine, inputs = GatedEngine(), RecordingInputs()
    worker = runner(
        store, media, engine, clock, inputs=inputs, registry=registry, prefetch=True, max_batch=1
    )
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert engine.running.wait(10)
    second = submit(store, key_id, clock, seed=2)
    worker.wake()
    time.sleep(0.2)  # several look-ahead polls (poll_interval_s=0.01)
    assert status_of(store, second, clock) is JobStatus.QUEUED, "the idle peer's to take"
    engine.gate.set()
    thread.join(10)
    worker.close()


def test_stopping_gives_a_looked_ahead_job_back(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    ahead = job_running_and_one_looked_ahead(store, media, clock, key_id, forever=True)
    worker, engine, thread, first, second = (
        ahead.worker,
        ahead.engine,
        ahead.thread,
        ahead.first,
        ahead.second,
    )
    worker.stop()  # a drain: the running job finishes, the looked-ahead one goes back
    engine.gate.set()
    thread.join(10)
    assert not thread.is_alive()
    assert status_of(store, first, clock) is JobStatus.COMPLETED
    back = store.get_job(second.id, now=clock())
    assert back is not None and back.status is JobStatus.QUEUED and back.attempts == 0
    assert engine.seeds == [1]


def test_a_looked_ahead_job_is_topped_up_with_later_batch_mates(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    submit(store, key_id, clock, seed=1, steps=3)
    engine, inputs = GatedEngine(), RecordingInputs()
    worker = runner(store, media, engine, clock, inputs=inputs, prefetch=True, max_batch=4)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert engine.running.wait(10)
    inputs.any_loaded.clear()
    submit(store, key_id, clock, seed=2)
    worker.wake()
    assert inputs.any_loaded.wait(10)  # job 2 looked ahead, alone
    for seed in (3, 4):  # its batch-mates arrive while job 1 still runs
        submit(store, key_id, clock, seed=seed)
    engine.gate.set()
    thread.join(10)
    assert worker.run_once() is True
    worker.wait_finished()
    assert engine.batch_sizes == [3], "jobs 2, 3 and 4 ran as one batch"
    assert sorted(engine.seeds) == [1, 2, 3, 4]
    worker.close()


def _submit_with_stored_input(
    store: SqliteStore, media: LocalMediaStore, key_id: str, clock: Clock, job_id: str
) -> tuple[Job, str]:
    """An edit job whose input the API stored in the media store (media/inline.py)."""
    import base64
    import io

    from qwenserve.media.inline import store_inline_images, stored_media_id

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    body = {"prompt": "x", "image": png, "seed": 3, "steps": 2, "guidance": 1}
    request, [media_id] = store_inline_images(
        validate_request("qwen-image-edit-fast", body),
        media,
        expires_at=time.time() + 3600,
        max_bytes=10**6,
        max_pixels=10**6,
    )
    assert stored_media_id(request.images[0].source) == media_id
    return enqueue(store, request, job_id, key_id, clock), media_id


def test_stored_inputs_are_deleted_once_the_job_has_ended(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    done, done_input = _submit_with_stored_input(store, media, key_id, clock, "job-done")
    worker = runner(store, media, SolidEngine(), clock)
    assert worker.run_once()
    worker.wait_finished()
    assert status_of(store, done, clock) is JobStatus.COMPLETED
    assert media.get(done_input, now=time.time()) is None
    failed, failed_input = _submit_with_stored_input(store, media, key_id, clock, "job-failed")
    runner(store, media, RaisingEngine(RuntimeError("boom")), clock).run_once()
    assert status_of(store, failed, clock) is JobStatus.FAILED
    assert media.get(failed_input, now=time.time()) is None


def test_stored_inputs_stay_while_the_job_may_still_run(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job, stored_input = _submit_with_stored_input(store, media, key_id, clock, "job-back")
    engine = HangingEngine()
    worker = runner(store, media, engine, clock)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert engine.started.wait(10)
    worker.cancel_current()  # a drain that timed out: the job goes back to the queue
    thread.join(10)
    assert status_of(store, job, clock) is JobStatus.QUEUED
    assert media.get(stored_input, now=time.time()) is not None, "the next attempt needs it"


class CompilingEngine(SolidEngine):
    """An engine that reports torch.compile counts, as the real one does with ``compile``."""

    def compile_counts(self) -> dict[str, int]:
        return {"compiles": 7, "recompiles": 0, "eager_fallbacks": 3}


def test_compile_counts_reach_metrics_through_the_announcement(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, tmp_path: Path
) -> None:
    from prometheus_client import generate_latest

    from qwenserve.api.ops import build_registry
    from qwenserve.api.services import Services
    from qwenserve.config import Settings

    registry = SqliteWorkerRegistry(tmp_path / "registry.db")
    runner(store, media, CompilingEngine(), clock, worker_id="w-c", registry=registry).announce()
    runner(store, media, SolidEngine(), clock, worker_id="w-plain", registry=registry).announce()
    services = Services(
        settings=Settings(), store=store, media=media, clock=clock, registry=registry
    )
    text = generate_latest(build_registry(services)).decode()
    assert 'qwenserve_worker_torch_compiles_total{kind="compiles",worker="w-c"} 7.0' in text
    assert 'qwenserve_worker_torch_compiles_total{kind="eager_fallbacks",worker="w-c"} 3.0' in text
    compile_lines = [x for x in text.splitlines() if x.startswith("qwenserve_worker_torch_")]
    assert len(compile_lines) == 3 and not any("w-plain" in x for x in compile_lines)


def test_an_announcement_without_compile_counts_still_reads() -> None:
    # Workers of the previous release announce no counts; a mixed cluster must still list them.
    old = (
        '{"worker_id": "w", "host": "h", "slugs": [], "resident": [], "current_job": null,'
        ' "started_at": 1.0, "last_seen": 2.0}'
    )
    assert WorkerInfo.from_json(old).compiles == {}


def test_a_looked_ahead_job_past_its_start_deadline_ends_refunded_unrun(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    """A job held in the look-ahead has not started: ``X-Start-Timeout`` still ends it."""
    before = balance(store, key_id) - 0.1  # what is left once the first job is charged
    ahead = job_running_and_one_looked_ahead(
        store, media, clock, key_id, forever=False, second_start_by=clock() + 5
    )
    clock.now += 10  # its deadline passes while it waits in the look-ahead
    ahead.engine.gate.set()
    ahead.thread.join(10)
    assert ahead.worker.run_once() is True
    ahead.worker.wait_finished()
    late = store.get_job(ahead.second.id, now=clock())
    assert late is not None and late.status is JobStatus.FAILED
    assert late.error_kind == "start_timeout" and ahead.engine.seeds == [1]
    assert balance(store, key_id) == pytest.approx(before), "the late job was refunded"
    assert status_of(store, ahead.first, clock) is JobStatus.COMPLETED
    ahead.worker.close()
