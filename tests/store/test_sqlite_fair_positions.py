"""SQLite's queue positions far back in a deep queue: counted exactly up to a bound, then
interpolated by projected start (``store/sqlite/fair_order.py``), so a poll's cost stays
bounded. Checked against the exact count and the order the claims then take."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenserve.jobs import Job
from qwenserve.store.sqlite import SqliteStore
from qwenserve.store.sqlite.fair_order import queue_position
from tests.store.contract import Clock
from tests.store.contract_fairness import HEAVY, LIGHT, fair_key, serve, submit_many

BOUND = 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "qwenserve.db")
    yield store
    store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def bounded(
    store: SqliteStore, clock: Clock, jobs: list[Job], keys: int = 1_000
) -> dict[str, int | None]:
    """Positions with the exact count bounded at BOUND and the per-key sum at ``keys``."""
    with store._db.read() as db:
        return {
            j.id: queue_position(db, j.id, now=clock.now, exact_up_to=BOUND, estimate_keys=keys)
            for j in jobs
        }


def errors(store: SqliteStore, clock: Clock, jobs: list[Job], keys: int = 1_000) -> list[int]:
    """How far each bounded position is from the exact one (checking the bounds on the way)."""
    exact = {j.id: store.queue_position(j.id, now=clock.now) for j in jobs}
    shown = bounded(store, clock, jobs, keys)
    out = []
    for job_id, position in exact.items():
        estimate = shown[job_id]
        assert position is not None and estimate is not None
        if position < BOUND:
            assert estimate == position, "exact up to the bound"
        else:
            assert BOUND <= estimate <= len(jobs) - 1
            out.append(abs(estimate - position))
    return out


def test_even_work_is_exact_past_the_bound(store: SqliteStore, clock: Clock) -> None:
    flood = fair_key(store, clock)
    jobs = submit_many(store, clock, flood, 120)
    assert bounded(store, clock, jobs) == {j.id: i for i, j in enumerate(jobs)}
    serve(store, clock, 30)
    assert bounded(store, clock, jobs[30:]) == {j.id: i for i, j in enumerate(jobs[30:])}


def test_uneven_work_is_summed_per_key(store: SqliteStore, clock: Clock) -> None:
    a, b = fair_key(store, clock, weight=2), fair_key(store, clock)
    jobs = submit_many(store, clock, a, 40, HEAVY) + submit_many(store, clock, b, 120, LIGHT)
    off = errors(store, clock, jobs)
    assert off and max(off) <= 2, off  # alike jobs per key: off by ties only
    ran = {j.id for j in serve(store, clock, 25)}
    assert max(errors(store, clock, [j for j in jobs if j.id not in ran])) <= 2


def test_many_keys_ahead_are_interpolated(store: SqliteStore, clock: Clock) -> None:
    keys = [fair_key(store, clock) for _ in range(12)]
    jobs = [job for key in keys for job in submit_many(store, clock, key, 10, LIGHT)]
    # Twelve keys ahead, at most three summed: the line between the last counted job and the
    # last job (evenly spread work: close).
    off = errors(store, clock, jobs, keys=3)
    assert off and max(off) <= 0.1 * len(jobs), off
    # The exact positions are the claim order.
    exact = {j.id: store.queue_position(j.id, now=clock.now) or 0 for j in jobs}
    assert [j.id for j in serve(store, clock, len(jobs))] == sorted(exact, key=exact.__getitem__)
