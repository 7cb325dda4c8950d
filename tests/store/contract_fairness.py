"""The Store contract for weighted fair queuing between keys and per-key concurrency.

A claim takes the next job of the key with the least service (GPU work: steps × megapixels)
relative to its weight, FIFO within a key; a key at its ``max_running`` waits without holding
up the others. Mixed into each backend's contract class beside ``StoreContract``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from qwenserve.jobs import Job
from qwenserve.store.base import ApiKey, Store
from tests.store.contract import Clock, claim_one, make_job, make_key, make_result

LIGHT = {"prompt": "a cat", "steps": 8, "width": 1024, "height": 1024}
HEAVY = {"prompt": "a cat", "steps": 50, "width": 1328, "height": 1328}


def fair_key(store: Store, clock: Clock, *, weight: float = 1.0, max_running: int = 0) -> ApiKey:
    key = make_key(store, clock, balance_usd=100.0)
    if weight == 1.0 and max_running == 0:
        return key
    updated = store.update_key(key.id, weight=weight, max_running=max_running)
    assert updated is not None
    return updated


def submit_many(
    store: Store, clock: Clock, key: ApiKey, n: int, params: dict[str, Any] | None = None
) -> list[Job]:
    jobs = []
    for _ in range(n):
        job = make_job(key, clock, params=dict(params or LIGHT))
        store.submit(job, rpm=0, now=clock.now)
        jobs.append(job)
        clock.advance(0.01)
    return jobs


def serve(store: Store, clock: Clock, n: int) -> list[Job]:
    """One worker: claim, finish, n times; the jobs in the order they ran."""
    ran = []
    for _ in range(n):
        job = claim_one(store, clock, "w1")
        if job is None:
            break
        assert store.complete(job.id, "w1", make_result(), now=clock.now)
        ran.append(job)
        clock.advance(1)
    return ran


class FairnessContract:
    def test_a_flooding_key_does_not_delay_another(self, store: Store, clock: Clock) -> None:
        flood, other = fair_key(store, clock), fair_key(store, clock)
        submit_many(store, clock, flood, 40)
        late = {j.id for j in submit_many(store, clock, other, 4)}
        ran = serve(store, clock, 44)
        assert [j.id for j in ran if j.key_id == other.id] == [
            j.id for j in ran if j.id in late
        ]  # FIFO within the key
        twelfth_of_flood = [i for i, j in enumerate(ran) if j.key_id == flood.id][11]
        assert {j.id for j in ran[:twelfth_of_flood]} >= late
        assert len(ran) == 44

    def test_jobs_of_one_key_run_in_submit_order(self, store: Store, clock: Clock) -> None:
        a, b = fair_key(store, clock), fair_key(store, clock)
        jobs_a = submit_many(store, clock, a, 5)
        jobs_b = submit_many(store, clock, b, 5)
        ran = serve(store, clock, 10)
        assert [j.id for j in ran if j.key_id == a.id] == [j.id for j in jobs_a]
        assert [j.id for j in ran if j.key_id == b.id] == [j.id for j in jobs_b]

    def test_weights_split_the_service(self, store: Store, clock: Clock) -> None:
        heavy_weight, light_weight = fair_key(store, clock, weight=3), fair_key(store, clock)
        submit_many(store, clock, heavy_weight, 60)
        submit_many(store, clock, light_weight, 60)
        counts = Counter(j.key_id for j in serve(store, clock, 80))
        assert 58 <= counts[heavy_weight.id] <= 62
        assert 18 <= counts[light_weight.id] <= 22

    def test_service_is_counted_in_gpu_work_not_jobs(self, store: Store, clock: Clock) -> None:
        big, small = fair_key(store, clock), fair_key(store, clock)
        submit_many(store, clock, big, 20, HEAVY)  # ~88 step-megapixels each
        submit_many(store, clock, small, 40, LIGHT)  # ~8.4 each
        counts = Counter(j.key_id for j in serve(store, clock, 24))
        assert counts[small.id] >= 5 * counts[big.id] >= 5

    def test_an_idle_key_earns_no_credit(self, store: Store, clock: Clock) -> None:
        busy, idle = fair_key(store, clock), fair_key(store, clock)
        submit_many(store, clock, busy, 40)
        serve(store, clock, 20)
        submit_many(store, clock, idle, 10)
        ran = serve(store, clock, 8)
        assert Counter(j.key_id for j in ran) == {busy.id: 4, idle.id: 4}

    def test_batch_claims_follow_the_fair_order(self, store: Store, clock: Clock) -> None:
        a, b = fair_key(store, clock), fair_key(store, clock)
        submit_many(store, clock, a, 6)
        submit_many(store, clock, b, 2)
        batch = store.claim(
            "w1", slugs=["qwen-image"], lease_s=30, max_attempts=3, now=clock.now, limit=4
        )
        assert Counter(j.key_id for j in batch) == {a.id: 2, b.id: 2}

    def test_model_filter_is_kept(self, store: Store, clock: Clock) -> None:
        a, b = fair_key(store, clock), fair_key(store, clock)
        fast = make_job(a, clock, slug="qwen-image-fast", params=dict(LIGHT))
        store.submit(fast, rpm=0, now=clock.now)
        submit_many(store, clock, b, 3)
        # b has the least tag, but only for a model this worker does not serve.
        only_fast = store.claim(
            "w1", slugs=["qwen-image-fast"], lease_s=30, max_attempts=3, now=clock.now, limit=5
        )
        assert [j.id for j in only_fast] == [fast.id]
        assert (
            store.claim("w1", slugs=["qwen-image-fast"], lease_s=30, max_attempts=3, now=clock.now)
            == []
        )
        rest = store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=5)
        assert [j.key_id for j in rest] == [b.id] * 3

    def test_a_key_served_for_one_model_waits_its_turn_for_another(
        self, store: Store, clock: Clock
    ) -> None:
        a, b = fair_key(store, clock), fair_key(store, clock)
        for slug in ("qwen-image", "qwen-image-fast"):
            for _ in range(3):
                store.submit(
                    make_job(a, clock, slug=slug, params=dict(LIGHT)), rpm=0, now=clock.now
                )
        submit_many(store, clock, b, 3)
        first = store.claim(
            "w1", slugs=["qwen-image-fast"], lease_s=30, max_attempts=3, now=clock.now, limit=3
        )
        assert [j.key_id for j in first] == [a.id] * 3
        # a has had three jobs of service for the other model: b goes first now (its own start
        # is the virtual time, so waiting for a model nobody served earned it nothing), then
        # the two alternate.
        nxt = store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=3)
        assert nxt[0].key_id == b.id
        assert Counter(j.key_id for j in nxt) == {b.id: 2, a.id: 1}

    def test_max_running_caps_a_key_without_blocking_others(
        self, store: Store, clock: Clock
    ) -> None:
        capped, other = fair_key(store, clock, max_running=1), fair_key(store, clock)
        capped_jobs = submit_many(store, clock, capped, 3)
        other_jobs = submit_many(store, clock, other, 2)
        taken = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=5)
        assert sorted(j.id for j in taken) == sorted(
            [capped_jobs[0].id, *(j.id for j in other_jobs)]
        )
        assert store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now) == []
        assert store.complete(capped_jobs[0].id, "w1", make_result(), now=clock.now)
        again = store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=5)
        assert [j.id for j in again] == [capped_jobs[1].id]
        assert store.release(capped_jobs[1].id, "w2", now=clock.now)  # gives its slot back
        back = store.claim("w3", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=5)
        assert [j.id for j in back] == [capped_jobs[1].id]

    def test_weight_and_max_running_are_kept_and_changed(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        assert (key.weight, key.max_running) == (1.0, 0)
        stored = store.get_key(key.id)
        assert stored is not None and (stored.weight, stored.max_running) == (1.0, 0)
        changed = store.update_key(key.id, weight=2.5, max_running=4)
        assert changed is not None and (changed.weight, changed.max_running) == (2.5, 4)
        assert store.update_key(key.id, rpm=7) == dataclasses.replace(changed, rpm=7)
        fresh = dataclasses.replace(
            make_key(store, clock),
            id="key-w-" + key.id,
            key_hash="h" + key.id,
            weight=0.5,
            max_running=2,
        )
        store.create_key(fresh)
        got = store.get_key(fresh.id)
        assert got is not None and (got.weight, got.max_running) == (0.5, 2)
