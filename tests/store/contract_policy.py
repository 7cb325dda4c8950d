"""The Store contract for the content policy: a request refused at submit is recorded FAILED
from the start, free and never queued; a blocked output may keep its charge. Every backend.

Mixed into each backend's contract class beside ``StoreContract`` (same ``store`` and ``clock``
fixtures).
"""

from __future__ import annotations

import dataclasses

import pytest

from qwenserve.errors import RateLimited
from qwenserve.jobs import Job, JobEventType, JobStatus
from qwenserve.policy import OUTPUT_BLOCKED, PROMPT_BLOCKED
from qwenserve.store.base import ApiKey, Idempotency, Store
from tests.store.contract import Clock, balance, make_job, make_key

KIND = "content_policy"


def refused(key: ApiKey, clock: Clock, *, cost_usd: float = 0.0) -> Job:
    """A job as the API records a request its content policy blocked."""
    return dataclasses.replace(
        make_job(key, clock, cost_usd=cost_usd),
        status=JobStatus.FAILED,
        error=PROMPT_BLOCKED,
        error_kind=KIND,
        finished_at=clock.now,
    )


class PolicyContract:
    """``Store.submit`` of a refused job and ``Store.fail(..., refund=False)``."""

    def test_a_refused_job_is_failed_free_and_never_claimed(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        # Even a cost on the job is not charged: a refused job costs nothing.
        job = refused(key, clock, cost_usd=0.5)
        outcome = store.submit(job, rpm=0, now=clock.now)
        assert outcome.remaining_usd == pytest.approx(1.0)
        assert balance(store, key) == pytest.approx(1.0)
        stored = store.get_job(job.id, now=clock.now)
        assert stored is not None and stored.status is JobStatus.FAILED
        assert (stored.error_kind, stored.error) == (KIND, PROMPT_BLOCKED)
        assert stored.finished_at == pytest.approx(clock.now)
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now) == []
        stats = store.stats(now=clock.now)
        assert stats.waiting_for_engine().get("qwen-image", 0) == 0
        assert store.queue_position(job.id, now=clock.now) is None
        [event] = store.job_events(job.id)
        assert event.type is JobEventType.FAILED
        assert (event.error_kind, event.error) == (KIND, PROMPT_BLOCKED)

    def test_a_refused_job_is_in_the_history_at_no_cost(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = refused(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        [record] = store.history(key.id, limit=10).records
        assert (record.request_id, record.status, record.cost_usd) == (job.id, "FAILED", 0.0)
        assert record.error == PROMPT_BLOCKED
        [row] = store.usage(key.id, since=clock.now, until=clock.now)
        assert (row.count, row.cost_usd) == (1, 0.0)

    def test_a_refused_job_counts_against_the_rate_limit(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0, rpm=1)
        store.submit(refused(key, clock), rpm=1, now=clock.now)
        with pytest.raises(RateLimited):
            store.submit(make_job(key, clock), rpm=1, now=clock.now)

    def test_a_refused_job_is_replayed_by_its_idempotency_key(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        same = Idempotency("retry-1", "hash-a")
        first = refused(key, clock)
        store.submit(first, rpm=0, now=clock.now, idempotency=same)
        again = store.submit(refused(key, clock), rpm=0, now=clock.now, idempotency=same)
        assert again.replay_of == first.id

    def test_a_refused_job_with_no_credit_left_is_still_recorded(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=0.0)
        job = refused(key, clock, cost_usd=0.1)
        store.submit(job, rpm=0, now=clock.now)
        stored = store.get_job(job.id, now=clock.now)
        assert stored is not None and stored.error_kind == KIND

    def test_fail_without_refund_keeps_the_charge(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        kept, refunded = make_job(key, clock, cost_usd=0.25), make_job(key, clock, cost_usd=0.25)
        for job in (kept, refunded):
            store.submit(job, rpm=0, now=clock.now)
        assert (
            len(store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=2))
            == 2
        )
        assert store.fail(
            kept.id, "w1", kind=KIND, message=OUTPUT_BLOCKED, now=clock.now, refund=False
        )
        assert store.fail(refunded.id, "w1", kind=KIND, message=OUTPUT_BLOCKED, now=clock.now)
        assert balance(store, key) == pytest.approx(0.75)
        records = {r.request_id: r for r in store.history(key.id, limit=10).records}
        assert records[kept.id].cost_usd == pytest.approx(0.25)
        assert records[refunded.id].cost_usd == 0.0
        [row] = store.usage(key.id, since=clock.now, until=clock.now)
        assert (row.count, row.cost_usd) == (2, pytest.approx(0.25))
        ended = store.get_job(kept.id, now=clock.now)
        assert ended is not None and ended.status is JobStatus.FAILED and ended.error_kind == KIND
        assert ended.cost_usd == pytest.approx(0.25), "a kept charge is the job's cost"
        gone = store.get_job(refunded.id, now=clock.now)
        assert gone is not None and gone.cost_usd == 0, "a refunded job reads as costing 0"
