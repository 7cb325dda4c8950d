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

    def test_a_released_job_is_charged_once(self, store: Store, clock: Clock) -> None:
        a, b = fair_key(store, clock), fair_key(store, clock)
        submit_many(store, clock, a, 3)
        submit_many(store, clock, b, 3)
        taken = claim_one(store, clock, "w1")
        assert taken is not None
        assert store.release(taken.id, "w1", now=clock.now)  # e.g. its worker shut down
        # The claim it gave back is undone: its key is no further ahead than before it.
        again = claim_one(store, clock, "w2")
        assert again is not None and again.id == taken.id
        ran = [again, *serve(store, clock, 5)]
        keys = [j.key_id for j in ran]
        assert keys[0::2] == [taken.key_id] * 3 and taken.key_id not in keys[1::2]

    def test_update_sets_the_balance_with_the_limits(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=3.0)
        job = make_job(key, clock, cost_usd=0.5)
        store.submit(job, rpm=0, now=clock.now)  # charged: 2.5 left
        changed = store.update_key(key.id, balance_usd=7.25, rpm=11, max_queued=2)
        assert changed is not None
        assert (changed.balance_usd, changed.rpm, changed.max_queued) == (7.25, 11, 2)
        assert store.get_key(key.id) == changed
        store.cancel(job.id, key.id, now=clock.now)  # a refund after the set adds to it
        again = store.get_key(key.id)
        assert again is not None and again.balance_usd == 7.75
        assert store.update_key(key.id, balance_usd=0) is not None
        assert store.topup(key.id, 1.5) == 1.5  # topup adds; update sets
        assert store.update_key("key-missing", balance_usd=5.0) is None
        assert store.get_key("key-missing") is None

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


def positions(store: Store, clock: Clock, jobs: list[Job]) -> dict[str, int | None]:
    return {j.id: store.queue_position(j.id, now=clock.now) for j in jobs}


def assert_positions_are_the_claim_order(store: Store, clock: Clock, jobs: list[Job]) -> None:
    """Every QUEUED job's position is its index in the order one worker then claims them."""
    shown = {job_id: p for job_id, p in positions(store, clock, jobs).items() if p is not None}
    assert sorted(shown.values()) == list(range(len(shown))), "one place each, from 0"
    ran = serve(store, clock, len(shown))
    assert [j.id for j in ran] == sorted(shown, key=lambda job_id: shown[job_id])


class FairPositionContract:
    """Queue positions (and so ETAs) are a job's place in the fair claim order, not its
    place in submit order."""

    def test_a_late_key_is_shown_near_the_front(self, store: Store, clock: Clock) -> None:
        flood, late = fair_key(store, clock), fair_key(store, clock)
        flooded = submit_many(store, clock, flood, 40)
        mine = submit_many(store, clock, late, 4)
        tie = 1 if flood.id < late.id else 0  # equal starts: the claim takes the lower key id
        assert [store.queue_position(j.id, now=clock.now) for j in mine] == [
            2 * i + tie for i in range(4)
        ]
        assert store.queue_position(flooded[0].id, now=clock.now) == 1 - tie
        assert store.queue_position(flooded[39].id, now=clock.now) == 43
        assert_positions_are_the_claim_order(store, clock, flooded + mine)

    def test_positions_follow_the_claims_as_they_happen(self, store: Store, clock: Clock) -> None:
        flood, late = fair_key(store, clock), fair_key(store, clock)
        flooded = submit_many(store, clock, flood, 20)
        serve(store, clock, 6)  # the flood's key is ahead in service: a newcomer starts at V
        mine = submit_many(store, clock, late, 3)
        assert store.queue_position(mine[0].id, now=clock.now) == 0
        everyone = flooded + mine
        for _ in range(5):
            shown = {k: v for k, v in positions(store, clock, everyone).items() if v is not None}
            nxt = claim_one(store, clock, "w1")
            assert nxt is not None and shown[nxt.id] == 0, "position 0 is the next claimed"
            assert store.complete(nxt.id, "w1", make_result(), now=clock.now)
        assert_positions_are_the_claim_order(store, clock, everyone)

    def test_positions_weigh_weights_and_gpu_work(self, store: Store, clock: Clock) -> None:
        heavy_weight, light = fair_key(store, clock, weight=3), fair_key(store, clock)
        big = submit_many(store, clock, heavy_weight, 12, HEAVY)
        small = submit_many(store, clock, light, 30, LIGHT)
        # A big job is ~88 units (29.4 at weight 3), a small one ~8.4: the sixth small job
        # starts at ~41.9, after two big ones, not behind all twelve.
        assert store.queue_position(small[5].id, now=clock.now) == 5 + 2
        assert_positions_are_the_claim_order(store, clock, big + small)

    def test_a_released_job_keeps_its_place(self, store: Store, clock: Clock) -> None:
        a, b = fair_key(store, clock), fair_key(store, clock)
        jobs_a, jobs_b = submit_many(store, clock, a, 3), submit_many(store, clock, b, 3)
        taken = claim_one(store, clock, "w1")
        assert taken is not None and positions(store, clock, [taken]) == {taken.id: None}
        assert store.release(taken.id, "w1", now=clock.now)
        assert store.queue_position(taken.id, now=clock.now) == 0
        assert_positions_are_the_claim_order(store, clock, jobs_a + jobs_b)

    def test_a_cancelled_job_leaves_the_order(self, store: Store, clock: Clock) -> None:
        a, b = fair_key(store, clock), fair_key(store, clock)
        jobs_a, jobs_b = submit_many(store, clock, a, 4), submit_many(store, clock, b, 4)
        before = store.queue_position(jobs_b[3].id, now=clock.now)
        store.cancel(jobs_a[0].id, a.id, now=clock.now)
        assert store.queue_position(jobs_a[0].id, now=clock.now) is None
        assert store.queue_position(jobs_b[3].id, now=clock.now) == (before or 0) - 1
        # The key's later stamps stay where they were (store/sqlite/fair_order.py): an estimate
        # off by at most the one job cancelled ahead of them.
        shown = positions(store, clock, jobs_a[1:] + jobs_b)
        assert sorted(p for p in shown.values() if p is not None) == list(range(7))
        ran = serve(store, clock, 7)
        assert all(abs(shown[j.id] - i) <= 1 for i, j in enumerate(ran)), (shown, ran)  # type: ignore[operator]
