"""Reliability by attack (issue 13): a fixture per failure mode against the real worker runner.

Each test asserts what a user would notice: every accepted job ends, exactly once, with its
credits exact (charged once for a completion, refunded for a failure), and nothing is left held.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from qwenserve.accounts.keys import create_api_key
from qwenserve.catalog import GenerationRequest
from qwenserve.jobs import Job, JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.store.sqlite import SqliteStore
from qwenserve.worker.config import WorkerConfig
from qwenserve.worker.retry import StoreRetry
from qwenserve.worker.runner import WorkerRunner
from tests.service.faults import DOWN, LOST, OK, Flaky
from tests.service.test_worker import Clock, Generated, NoInputs, SolidEngine, balance, submit

COST = 0.1
NO_WAIT = StoreRetry(sleep=lambda _s: None)


def make_runner(
    store: Any,
    media: Any,
    engine: SolidEngine,
    clock: Clock,
    *,
    retry: StoreRetry = NO_WAIT,
    worker_id: str = "w1",
    max_batch: int = 4,
) -> WorkerRunner:
    return WorkerRunner(
        store=store,
        media=media,
        engine=engine,
        inputs=NoInputs(),
        config=WorkerConfig(
            worker_id=worker_id,
            lease_s=30.0,
            max_attempts=2,
            max_batch=max_batch,
            batch_window_s=0.0,
            prefetch=False,
            poll_interval_s=0.01,
        ),
        clock=clock,
        retry=retry,
    )


def drain(worker: WorkerRunner) -> None:
    """Run until nothing is runnable, then wait for the results to be stored."""
    try:
        while worker.run_once():
            pass
        worker.wait_finished()
        assert worker.control.held() == [], "a job is still held after its end"
    finally:
        worker.close()


def assert_all_ended(
    store: SqliteStore, jobs: Sequence[Job], clock: Clock, *, failed: Sequence[str] = ()
) -> None:
    for job in jobs:
        stored = store.get_job(job.id, now=clock())
        assert stored is not None
        expected = JobStatus.FAILED if job.id in failed else JobStatus.COMPLETED
        assert stored.status is expected, (job.id, stored.status, stored.error)


def media_count(root: Path) -> int:
    return sum(1 for path in root.rglob("*") if path.is_file() and path.suffix != ".json")


# --- defect 3: a failed batch top-up must not orphan the jobs in hand ----------------------


def test_a_failed_batch_top_up_keeps_the_jobs_in_hand(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    jobs = [submit(store, key_id, clock, seed=seed) for seed in (1, 2, 3)]
    flaky = Flaky(store)
    flaky.script("claim", OK, DOWN)  # the first job is claimed, topping up its batch fails
    worker = make_runner(flaky, media, SolidEngine(), clock)
    assert worker.run_once()  # runs the job in hand instead of raising with it held
    worker.wait_finished()
    assert worker.control.held() == []  # nothing heartbeated that nobody will end
    drain(worker)
    assert_all_ended(store, jobs, clock)
    assert balance(store, key_id) == pytest.approx(1.0 - 3 * COST)


# --- defect 4: a store blip while storing a finished image is retried ----------------------


@pytest.mark.parametrize("method", ["complete", "put"])
def test_a_store_outage_at_the_end_is_retried_not_failed(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str, method: str
) -> None:
    job = submit(store, key_id, clock)
    flaky_store, flaky_media = Flaky(store), Flaky(media)
    (flaky_store if method == "complete" else flaky_media).script(method, DOWN, DOWN, DOWN)
    drain(make_runner(flaky_store, flaky_media, SolidEngine(), clock))
    assert_all_ended(store, [job], clock)
    assert balance(store, key_id) == pytest.approx(1.0 - COST)


def test_a_completion_whose_reply_was_lost_keeps_its_image(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str, tmp_path: Path
) -> None:
    job = submit(store, key_id, clock)
    flaky = Flaky(store)
    flaky.script("complete", LOST)  # applied; the retry is refused as not ours any more
    drain(make_runner(flaky, media, SolidEngine(), clock))
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.COMPLETED and stored.result
    assert media.get(stored.result.media_id, now=clock()) is not None
    assert media_count(tmp_path / "media") == 1
    assert balance(store, key_id) == pytest.approx(1.0 - COST)


def test_an_outage_longer_than_the_retries_leaves_the_job_to_its_lease(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock)
    flaky = Flaky(store)
    flaky.script("complete", *[DOWN] * 1000)
    patient = StoreRetry(budget_s=0.05, first_wait_s=0.01, max_wait_s=0.01)
    drain(make_runner(flaky, media, SolidEngine(), clock, retry=patient))
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.PROCESSING  # not failed
    clock.now += 31  # its lease runs out: another worker completes it
    flaky._scripts.clear()
    drain(make_runner(store, media, SolidEngine(), clock, worker_id="w2"))
    assert_all_ended(store, [job], clock)
    assert balance(store, key_id) == pytest.approx(1.0 - COST)


# --- one bad job never fails another ------------------------------------------------------


class PoisonEngine(SolidEngine):
    """Raises (a bug, not out of memory) on any call that includes the seed ``poison``."""

    def __init__(self, poison: int) -> None:
        super().__init__()
        self.poison = poison
        self.seen: list[list[int]] = []

    def generate_batch(
        self, requests: Sequence[GenerationRequest], **kwargs: object
    ) -> list[Generated]:
        self.seen.append([int(r.seed or 0) for r in requests])
        if any(r.seed == self.poison for r in requests):
            raise RuntimeError("index out of range in the scheduler")
        return [SolidEngine.generate(self, r) for r in requests]

    def generate(self, request: GenerationRequest, **kwargs: object) -> Generated:  # type: ignore[override]
        self.seen.append([int(request.seed or 0)])
        if request.seed == self.poison:
            raise RuntimeError("index out of range in the scheduler")
        return super().generate(request)


def test_a_batch_that_raises_is_retried_one_at_a_time(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    jobs = [submit(store, key_id, clock, seed=seed) for seed in (11, 12, 13, 14)]
    engine = PoisonEngine(poison=13)
    drain(make_runner(store, media, engine, clock))
    assert engine.seen == [[11, 12, 13, 14], [11], [12], [13], [14]]
    assert_all_ended(store, jobs, clock, failed=["job-13"])
    culprit = store.get_job("job-13", now=clock())
    assert culprit is not None and culprit.error and "internal error" in culprit.error
    assert balance(store, key_id) == pytest.approx(1.0 - 3 * COST)  # the culprit is refunded


def test_jobs_of_a_batch_whose_worker_died_run_again_alone(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    jobs = [submit(store, key_id, clock, seed=seed) for seed in (21, 22, 23)]
    taken = store.claim("dead", slugs=None, lease_s=5, max_attempts=2, now=clock(), limit=3)
    assert len(taken) == 3  # a batch, then its worker process died (a segfault, say)
    clock.now += 6
    engine = SolidEngine()
    drain(make_runner(store, media, engine, clock))
    # Each runs alone: whichever crashed that worker cannot take its batch-mates down again.
    assert engine.batch_sizes == []
    assert_all_ended(store, jobs, clock)


# --- the SQLite file locked by another process for some seconds ----------------------------


class LockingEngine(SolidEngine):
    """While it generates, another connection takes the database's exclusive lock and holds it
    for ``hold_s`` (a backup, the `qwenserve keys` CLI, a stuck process)."""

    def __init__(self, path: Path, hold_s: float) -> None:
        super().__init__()
        self.path, self.hold_s = path, hold_s
        self.locker: threading.Thread | None = None

    def generate(self, request: GenerationRequest, **kwargs: object) -> Generated:  # type: ignore[override]
        locked = threading.Event()

        def hold() -> None:
            other = sqlite3.connect(self.path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(self.hold_s)
            other.execute("COMMIT")
            other.close()

        self.locker = threading.Thread(target=hold)
        self.locker.start()
        locked.wait()
        return super().generate(request)


def test_a_locked_sqlite_file_is_waited_out(
    tmp_path: Path, media: LocalMediaStore, clock: Clock
) -> None:
    store = SqliteStore(tmp_path / "locked.db", busy_timeout_s=0.2)
    _, key = create_api_key(store, name="t", credits_usd=1.0, rpm=0, now=clock())
    job = submit(store, key.id, clock)
    engine = LockingEngine(store.path, hold_s=2.0)
    real_time = StoreRetry(first_wait_s=0.05, max_wait_s=0.5)
    worker = make_runner(store, media, engine, clock, retry=real_time)
    assert worker.run_once()
    worker.wait_finished()  # completing it waited for the lock instead of failing the job
    assert engine.locker is not None
    engine.locker.join()
    drain(worker)
    assert_all_ended(store, [job], clock)
    assert balance(store, key.id) == pytest.approx(1.0 - COST)


# --- Redis killed and restarted mid-burst (a real redis-server with an append-only file) ---


@pytest.mark.slow
@pytest.mark.redis
def test_redis_killed_mid_burst_every_job_ends_once(tmp_path: Path) -> None:
    from qwenserve.store.redis import RedisStore
    from tests.redis_server import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer(appendonly=True, dir=tmp_path / "redis") as server:
        store = RedisStore.from_url(server.url, namespace="burst")
        media = LocalMediaStore(tmp_path / "media")
        _, key = create_api_key(store, name="t", credits_usd=10.0, rpm=0, now=time.time())
        jobs = [submit(store, key.id, time.time, seed=seed) for seed in range(100, 124)]
        time.sleep(1.5)  # the append-only file has them (fsync every second)

        class SlowEngine(SolidEngine):
            def generate(self, request: GenerationRequest, **kwargs: object) -> Generated:  # type: ignore[override]
                time.sleep(0.1)
                return super().generate(request)

        worker = WorkerRunner(
            store=store,
            media=media,
            engine=SlowEngine(),
            inputs=NoInputs(),
            config=WorkerConfig(
                worker_id="w1",
                lease_s=3.0,
                max_attempts=3,
                max_batch=2,
                batch_window_s=0.0,
                poll_interval_s=0.05,
            ),
            retry=StoreRetry(first_wait_s=0.1, max_wait_s=0.5),
        )
        thread = threading.Thread(target=worker.run_forever)
        thread.start()
        try:
            time.sleep(0.5)
            server.kill()  # mid-burst: some jobs done, some running, most queued
            time.sleep(3.0)
            server.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ended = [store.get_job(j.id, now=time.time()) for j in jobs]
                if all(j is not None and j.status.is_terminal for j in ended):
                    break
                time.sleep(0.2)
        finally:
            worker.stop()
            thread.join(30)
        for job in jobs:
            stored = store.get_job(job.id, now=time.time())
            assert stored is not None and stored.status is JobStatus.COMPLETED, (job.id, stored)
        remaining = store.get_key(key.id)
        assert remaining is not None
        assert remaining.balance_usd == pytest.approx(10.0 - len(jobs) * COST)
        store.close()


# --- a store outage is one warning line per missed heartbeat, not a traceback --------------


def test_a_heartbeat_missed_in_an_outage_logs_one_line_other_errors_their_traceback(
    store: SqliteStore, clock: Clock, key_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    from qwenserve.errors import ServiceUnavailable
    from qwenserve.worker.control import JobControl

    class Failing:
        def __init__(self) -> None:
            self.errors: list[Exception] = [
                ServiceUnavailable("the job store is unavailable; retry later"),
                RuntimeError("a bug"),
            ]

        def heartbeat(self, *args: object, **kwargs: object) -> None:
            raise self.errors.pop(0)

    control = JobControl(Failing(), worker_id="w1", lease_s=30.0, clock=clock)  # type: ignore[arg-type]
    control.hold([submit(store, key_id, clock, seed=1)])
    with caplog.at_level("WARNING", logger="qwenserve.worker"):
        control.beat()
        control.beat()
    outage, bug = [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert "unavailable" in outage.getMessage() and not outage.exc_info
    assert bug.exc_info and "a bug" in bug.getMessage()
