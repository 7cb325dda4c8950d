"""A batch that runs out of memory is retried in halves by the real worker runner, down to
single requests; a single request that cannot fit fails alone, naming its size, and the worker
serves on."""

from __future__ import annotations

from collections.abc import Sequence

from qwenserve.catalog import GenerationRequest
from qwenserve.errors import OutOfMemory
from qwenserve.jobs import JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.store.sqlite import SqliteStore
from tests.service.test_worker import Clock, Generated, SolidEngine, runner, submit


class OutOfMemoryAbove(SolidEngine):
    """Runs out of memory for batches larger than ``max_fit`` (0: even for one request)."""

    def __init__(self, max_fit: int) -> None:
        super().__init__()
        self.max_fit = max_fit
        self.attempts: list[int] = []

    def generate_batch(
        self, requests: Sequence[GenerationRequest], **kwargs: object
    ) -> list[Generated]:
        self.attempts.append(len(requests))
        if len(requests) > self.max_fit:
            raise OutOfMemory(f"out of memory generating 1328x1328 ×{len(requests)} on cuda")
        return super().generate_batch(requests)

    def generate(self, request: GenerationRequest, **kwargs: object) -> Generated:  # type: ignore[override]
        if self.max_fit < 1:
            self.attempts.append(1)
            raise OutOfMemory("out of memory generating 1328x1328 ×1 on cuda: try a smaller size")
        return super().generate(request)


def test_a_batch_out_of_memory_is_split_until_it_fits(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    jobs = [submit(store, key_id, clock, seed=seed) for seed in range(1, 6)]
    engine = OutOfMemoryAbove(max_fit=1)
    worker = runner(store, media, engine, clock, max_batch=5)
    assert worker.run_once()
    worker.wait_finished()
    for job in jobs:
        stored = store.get_job(job.id, now=clock())
        assert stored is not None and stored.status is JobStatus.COMPLETED, stored
        assert stored.result is not None and stored.result.seed == job.request.seed
    assert engine.attempts == [5, 2, 3, 2]  # 5 → 2 + 3 → (1 + 1) + (1 + 2 → 1 + 1)


def test_a_single_request_out_of_memory_fails_alone_and_the_worker_serves_on(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    first, second = (submit(store, key_id, clock, seed=seed) for seed in (1, 2))
    engine = OutOfMemoryAbove(max_fit=0)
    worker = runner(store, media, engine, clock, max_batch=2)
    assert worker.run_once()
    worker.wait_finished()
    assert engine.attempts == [2, 1, 1]
    for job in (first, second):
        stored = store.get_job(job.id, now=clock())
        assert stored is not None and stored.status is JobStatus.FAILED
        assert stored.error_kind == "OutOfMemory" and "1328x1328" in (stored.error or "")
    engine.max_fit = 1  # memory is back: the next job runs
    third = submit(store, key_id, clock, seed=3)
    assert worker.run_once()
    worker.wait_finished()
    stored = store.get_job(third.id, now=clock())
    assert stored is not None and stored.status is JobStatus.COMPLETED
