"""The Store contract for idempotency keys: one replayed job, one charge, on every backend.

Mixed into each backend's contract class beside ``StoreContract`` (same ``store`` and ``clock``
fixtures).
"""

from __future__ import annotations

import threading

import pytest

from qwenserve.errors import Conflict, InsufficientCredits
from qwenserve.jobs import Job
from qwenserve.store.base import Idempotency, Store, SubmitOutcome
from qwenserve.store.rules import IDEMPOTENCY_HEADER, IDEMPOTENCY_TTL_S
from tests.store.contract import Clock, balance, make_job, make_key, run_in_threads

SAME = Idempotency("retry-1", "hash-a")


class IdempotencyContract:
    """``Store.submit(..., idempotency=...)`` (see ``qwenserve.store.base``)."""

    def test_first_submit_is_admitted_and_charged(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        outcome = store.submit(make_job(key, clock), rpm=0, now=clock.now, idempotency=SAME)
        assert outcome.replay_of is None
        assert balance(store, key) == pytest.approx(0.9)

    def test_replay_names_the_first_job_and_charges_nothing(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0, rpm=5)
        first = make_job(key, clock)
        store.submit(first, rpm=5, now=clock.now, idempotency=SAME)
        clock.advance(3600)
        again = make_job(key, clock)
        outcome = store.submit(again, rpm=5, now=clock.now, idempotency=SAME)
        assert outcome.replay_of == first.id
        assert outcome.remaining_usd == pytest.approx(0.9)
        assert balance(store, key) == pytest.approx(0.9)
        assert store.get_job(again.id, now=clock.now) is None
        assert store.stats(now=clock.now).queued_by_model == {"qwen-image": 1}

    def test_replay_is_not_refused_by_the_rate_limit(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0, rpm=1)
        first = make_job(key, clock)
        store.submit(first, rpm=1, now=clock.now, idempotency=SAME)
        outcome = store.submit(make_job(key, clock), rpm=1, now=clock.now, idempotency=SAME)
        assert outcome.replay_of == first.id
        assert outcome.rate_limit_remaining == 0

    def test_another_body_is_a_conflict_naming_the_header(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        first = make_job(key, clock)
        store.submit(first, rpm=0, now=clock.now, idempotency=SAME)
        with pytest.raises(Conflict) as raised:
            other = Idempotency(SAME.key, "hash-b")
            store.submit(make_job(key, clock), rpm=0, now=clock.now, idempotency=other)
        assert raised.value.field == IDEMPOTENCY_HEADER
        assert first.id in raised.value.message
        assert raised.value.job_status == "QUEUED"
        assert balance(store, key) == pytest.approx(0.9)

    def test_keys_are_scoped_to_their_api_key(self, store: Store, clock: Clock) -> None:
        alice = make_key(store, clock, balance_usd=1.0)
        bob = make_key(store, clock, balance_usd=1.0)
        a, b = make_job(alice, clock), make_job(bob, clock)
        assert store.submit(a, rpm=0, now=clock.now, idempotency=SAME).replay_of is None
        other_body = Idempotency(SAME.key, "hash-b")
        assert store.submit(b, rpm=0, now=clock.now, idempotency=other_body).replay_of is None
        assert balance(store, alice) == balance(store, bob) == pytest.approx(0.9)

    def test_records_expire_after_their_ttl(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        first = make_job(key, clock, ttl_s=2 * IDEMPOTENCY_TTL_S)  # outlives its record
        store.submit(first, rpm=0, now=clock.now, idempotency=SAME)
        clock.advance(IDEMPOTENCY_TTL_S + 1)
        store.purge_expired(now=clock.now)
        later = make_job(key, clock)
        outcome = store.submit(later, rpm=0, now=clock.now, idempotency=SAME)
        assert outcome.replay_of is None
        assert balance(store, key) == pytest.approx(0.8)
        # ... and the new record holds from now on, another body included.
        with pytest.raises(Conflict):
            other = Idempotency(SAME.key, "hash-b")
            store.submit(make_job(key, clock), rpm=0, now=clock.now, idempotency=other)

    def test_a_refused_submit_records_nothing(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=0.05)
        with pytest.raises(InsufficientCredits):
            store.submit(make_job(key, clock), rpm=0, now=clock.now, idempotency=SAME)
        store.topup(key.id, 1.0)
        other = Idempotency(SAME.key, "hash-b")  # no record: another body is fine now
        assert store.submit(make_job(key, clock), rpm=0, now=clock.now, idempotency=other)

    def test_concurrent_duplicates_make_one_job_and_one_charge(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=10.0)
        jobs = [make_job(key, clock) for _ in range(50)]
        outcomes: list[SubmitOutcome] = []
        lock = threading.Lock()

        def submit(job: Job) -> None:
            outcome = store.submit(job, rpm=0, now=clock.now, idempotency=SAME)
            with lock:
                outcomes.append(outcome)

        run_in_threads(8, [lambda job=job: submit(job) for job in jobs])
        fresh = [o for o in outcomes if o.replay_of is None]
        assert len(fresh) == 1
        admitted = {job.id for job in jobs if store.get_job(job.id, now=clock.now) is not None}
        assert len(admitted) == 1
        assert {o.replay_of for o in outcomes if o.replay_of is not None} == admitted
        assert balance(store, key) == pytest.approx(9.9)
