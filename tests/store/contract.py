"""The Store contract: one suite every backend must pass (SQLite here, Redis beside it).

A backend's test module subclasses ``StoreContract`` and provides two fixtures: ``store`` (a
fresh, empty Store, closed afterwards) and ``clock`` (a ``Clock``). Every store call passes
``now=clock.now`` so leases, TTLs and rate-limit windows are tested without sleeping.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from qwenserve.catalog import MODELS, GenerationRequest, SizeKind, validate_request
from qwenserve.catalog.sizes import fix_size
from qwenserve.errors import (
    Conflict,
    InsufficientCredits,
    InvalidRequest,
    RateLimited,
    UnknownRequest,
)
from qwenserve.jobs import (
    CANCELLED,
    EXPIRED,
    Job,
    JobEvent,
    JobEventType,
    JobProgress,
    JobResult,
    JobStatus,
    Progress,
)
from qwenserve.store.base import ApiKey, Store


def renewed(store: Store, job_id: str, worker_id: str, clock: Clock) -> bool:
    """Renew one lease the way a worker does (a heartbeat without progress): still owned?"""
    return job_id in store.heartbeat(worker_id, {job_id: None}, lease_s=30, now=clock.now).owned


START_S = 1_700_000_000.0
"""Where every test clock starts (not on a minute boundary, on purpose)."""

TTL_S = 3600.0


class Clock:
    """An injected clock: ``now`` only moves when a test says so."""

    def __init__(self, now: float = START_S) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def __call__(self) -> float:
        return self.now


_ids = itertools.count(1)


def make_key(
    store: Store,
    clock: Clock,
    *,
    balance_usd: float = 10.0,
    rpm: int = 0,
    models: tuple[str, ...] = (),
    name: str = "test",
) -> ApiKey:
    """Create and store a key with a unique id and hash."""
    n = next(_ids)
    key = ApiKey(
        id=f"key-{n}-{uuid.uuid4().hex[:8]}",
        key_hash=uuid.uuid4().hex + uuid.uuid4().hex,
        name=name,
        balance_usd=balance_usd,
        rpm=rpm,
        models=models,
        created_at=clock.now,
    )
    store.create_key(key)
    return key


def make_request(
    slug: str = "qwen-image",
    *,
    prompt: str = "a cat",
    seed: int = 7,
    steps: int = 30,
    width: int | None = None,
    height: int | None = None,
) -> GenerationRequest:
    """A typed request for any slug (the store takes a slug the catalog does not know), its
    size fixed as admission fixes it: ``width``/``height`` exact, else the slug's default."""
    spec = MODELS.get(slug)
    size = fix_size(
        spec.recipe if spec is not None else None,
        width=width,
        height=height,
        aspect_ratio=None,
        has_images=False,
    )
    return GenerationRequest(
        slug=slug,
        prompt=prompt,
        steps=steps,
        guidance=1.0,
        seed=seed,
        image_format="png",
        quality=90,
        base64=False,
        size=size,
        width=width,
        height=height,
    )


def make_job(
    key: ApiKey,
    clock: Clock,
    *,
    slug: str = "qwen-image",
    cost_usd: float = 0.1,
    ttl_s: float = TTL_S,
    params: dict[str, Any] | None = None,
    request: GenerationRequest | None = None,
) -> Job:
    """A QUEUED job as the API builds it, created now: ``request``, or one made of ``params``
    (``make_request``'s arguments)."""
    return Job(
        id=f"job-{next(_ids)}-{uuid.uuid4().hex[:8]}",
        key_id=key.id,
        request=request if request is not None else make_request(slug, **(params or {})),
        status=JobStatus.QUEUED,
        created_at=clock.now,
        expires_at=clock.now + ttl_s,
        cost_usd=cost_usd,
    )


def balance(store: Store, key: ApiKey) -> float:
    current = store.get_key(key.id)
    assert current is not None
    return current.balance_usd


def make_result(seed: int = 7) -> JobResult:
    return JobResult(
        media_id=f"media-{seed}",
        content_type="image/png",
        width=1024,
        height=768,
        seed=seed,
        inference_time_s=1.25,
        size_bytes=123_456,
    )


def claim_one(
    store: Store,
    clock: Clock,
    worker_id: str = "w1",
    *,
    lease_s: float = 30.0,
    max_attempts: int = 3,
    slugs: Collection[str] | None = None,
) -> Job | None:
    jobs = store.claim(
        worker_id, slugs=slugs, lease_s=lease_s, max_attempts=max_attempts, now=clock.now
    )
    assert len(jobs) <= 1
    return jobs[0] if jobs else None


class StoreContract:
    """The behaviour every Store backend promises (see ``qwenserve.store.base``)."""

    # --- keys --------------------------------------------------------------------------------
    def test_create_and_get_key(self, store: Store, clock: Clock) -> None:
        key = make_key(
            store, clock, balance_usd=2.5, rpm=30, models=("qwen-image", "qwen-image-fast")
        )
        got = store.get_key(key.id)
        assert got == key
        assert store.key_by_hash(key.key_hash) == key
        assert store.get_key("no-such-key") is None
        assert store.key_by_hash("0" * 64) is None

    def test_list_keys(self, store: Store, clock: Clock) -> None:
        assert store.list_keys() == []
        first = make_key(store, clock, name="first")
        second = make_key(store, clock, name="second", models=("qwen-image",))
        listed = store.list_keys()
        assert sorted(listed, key=lambda k: k.id) == sorted([first, second], key=lambda k: k.id)

    def test_revoke_key(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        assert store.revoke_key(key.id) is True
        revoked = store.key_by_hash(key.key_hash)
        assert revoked is not None and revoked.revoked
        got = store.get_key(key.id)
        assert got is not None and got.revoked
        assert store.revoke_key("no-such-key") is False

    def test_topup(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        assert store.topup(key.id, 0.25) == pytest.approx(1.25)
        assert store.topup(key.id, 0.1) == pytest.approx(1.35)
        assert balance(store, key) == pytest.approx(1.35)
        with pytest.raises(KeyError):
            store.topup("no-such-key", 1.0)

    def test_small_amounts_do_not_drift(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=0.0)
        for _ in range(10):
            store.topup(key.id, 0.1)
        assert balance(store, key) == pytest.approx(1.0, abs=1e-9)
        for _ in range(10):
            store.submit(make_job(key, clock, cost_usd=0.1), rpm=0, now=clock.now)
        assert balance(store, key) == pytest.approx(0.0, abs=1e-9)

    # --- submit: credits ---------------------------------------------------------------------
    def test_submit_debits_exactly_the_cost(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        outcome = store.submit(make_job(key, clock, cost_usd=0.3), rpm=0, now=clock.now)
        assert outcome.remaining_usd == pytest.approx(0.7, abs=1e-9)
        assert outcome.rate_limit_remaining is None
        assert balance(store, key) == pytest.approx(0.7, abs=1e-9)

    def test_submit_exact_balance_is_admitted(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=0.3)
        outcome = store.submit(make_job(key, clock, cost_usd=0.3), rpm=0, now=clock.now)
        assert outcome.remaining_usd == pytest.approx(0.0, abs=1e-9)

    def test_insufficient_credits_changes_nothing(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=0.05)
        job = make_job(key, clock, cost_usd=0.1)
        with pytest.raises(InsufficientCredits):
            store.submit(job, rpm=0, now=clock.now)
        assert store.get_job(job.id, now=clock.now) is None
        assert balance(store, key) == pytest.approx(0.05)
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now) == []
        assert store.stats(now=clock.now).queued_by_model.get("qwen-image", 0) == 0

    def test_free_job_is_always_admitted(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=0.0)
        job = make_job(key, clock, cost_usd=0.0)
        outcome = store.submit(job, rpm=0, now=clock.now)
        assert outcome.remaining_usd == 0.0
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.status is JobStatus.QUEUED

    # --- submit: rate limits -----------------------------------------------------------------
    def test_rate_limit_per_minute(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=10.0, rpm=3)
        remaining = [
            store.submit(make_job(key, clock), rpm=3, now=clock.now).rate_limit_remaining
            for _ in range(3)
        ]
        assert remaining == [2, 1, 0]
        before = balance(store, key)
        clock.advance(10)
        rejected = make_job(key, clock)
        with pytest.raises(RateLimited) as caught:
            store.submit(rejected, rpm=3, now=clock.now)
        error = caught.value
        assert 0 < error.retry_after_s <= 60
        assert clock.now < error.reset_at <= clock.now + 60
        assert error.limit == 3
        # a rate-limited submit neither debits nor inserts
        assert balance(store, key) == pytest.approx(before)
        assert store.get_job(rejected.id, now=clock.now) is None

        clock.advance(60)
        outcome = store.submit(make_job(key, clock), rpm=3, now=clock.now)
        assert outcome.rate_limit_remaining == 2

    def test_rate_limit_retry_after_is_honest(self, store: Store, clock: Clock) -> None:
        """Waiting exactly retry_after_s is enough to be admitted again."""
        key = make_key(store, clock, rpm=1)
        store.submit(make_job(key, clock), rpm=1, now=clock.now)
        clock.advance(25)
        with pytest.raises(RateLimited) as caught:
            store.submit(make_job(key, clock), rpm=1, now=clock.now)
        clock.advance(caught.value.retry_after_s)
        store.submit(make_job(key, clock), rpm=1, now=clock.now)

    def test_rate_limits_are_per_key(self, store: Store, clock: Clock) -> None:
        first = make_key(store, clock, rpm=1)
        second = make_key(store, clock, rpm=1)
        store.submit(make_job(first, clock), rpm=1, now=clock.now)
        store.submit(make_job(second, clock), rpm=1, now=clock.now)
        with pytest.raises(RateLimited):
            store.submit(make_job(first, clock), rpm=1, now=clock.now)

    def test_rpm_zero_is_unlimited(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=100.0)
        for _ in range(150):
            outcome = store.submit(make_job(key, clock, cost_usd=0.01), rpm=0, now=clock.now)
            assert outcome.rate_limit_remaining is None
        assert balance(store, key) == pytest.approx(98.5, abs=1e-9)

    def test_insufficient_credits_does_not_use_up_the_rate_limit(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=0.0, rpm=1)
        with pytest.raises(InsufficientCredits):
            store.submit(make_job(key, clock, cost_usd=0.1), rpm=1, now=clock.now)
        store.topup(key.id, 1.0)
        outcome = store.submit(make_job(key, clock, cost_usd=0.1), rpm=1, now=clock.now)
        assert outcome.rate_limit_remaining == 0

    # --- get_job -----------------------------------------------------------------------------
    def test_get_job_round_trips_every_field(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        request = validate_request(
            "qwen-image-edit-plus-product-photography",
            {
                "prompt": "un chat sur un toit, 夜",
                "seed": 2147483647,
                "image_1": "https://example.com/a.png",
                "image_2": "https://example.com/b.png",
                "aspect_ratio": "4:5",
                "lora_2_url": "https://example.com/a.safetensors",
                "base64": True,
            },
        )
        request = dataclasses.replace(
            request, negative_prompt="flou", partial_images=2, preview_id="p-1"
        )
        job = make_job(key, clock, cost_usd=0.037, request=request)
        store.submit(job, rpm=0, now=clock.now)
        got = store.get_job(job.id, now=clock.now)
        assert got is not None
        assert got.id == job.id
        assert got.slug == "qwen-image-edit-plus-product-photography"
        assert got.key_id == key.id
        assert got.request == request  # typed through: images, LoRAs, size and all
        assert got.size == request.size and got.size.kind is SizeKind.RATIO
        assert got.status is JobStatus.QUEUED
        assert got.created_at == job.created_at
        assert got.expires_at == job.expires_at
        assert got.cost_usd == pytest.approx(0.037, abs=1e-9)
        assert got.attempts == 0
        assert got.started_at is None
        assert got.finished_at is None
        assert got.result is None
        assert got.error is None and got.error_kind is None
        assert got.worker_id is None and got.lease_until is None

    def test_get_job_unknown(self, store: Store, clock: Clock) -> None:
        assert store.get_job("no-such-job", now=clock.now) is None

    def test_get_job_hides_expired(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock, ttl_s=100)
        store.submit(job, rpm=0, now=clock.now)
        clock.advance(99)
        assert store.get_job(job.id, now=clock.now) is not None
        clock.advance(1)
        assert store.get_job(job.id, now=clock.now) is None

    # --- claim -------------------------------------------------------------------------------
    def test_claim_takes_oldest_first(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        jobs = []
        for _ in range(3):
            job = make_job(key, clock)
            store.submit(job, rpm=0, now=clock.now)
            jobs.append(job)
            clock.advance(1)
        claimed = [claim_one(store, clock, f"w{i}") for i in range(3)]
        assert [j.id if j else None for j in claimed] == [j.id for j in jobs]
        assert claim_one(store, clock, "w9") is None

    def test_claim_same_instant_keeps_submit_order(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        jobs = [make_job(key, clock) for _ in range(5)]
        for job in jobs:
            store.submit(job, rpm=0, now=clock.now)
        claimed = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=5)
        assert [j.id for j in claimed] == [j.id for j in jobs]

    def test_claim_sets_ownership(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        clock.advance(2)
        claimed = claim_one(store, clock, "w1", lease_s=30)
        assert claimed is not None
        for seen in (claimed, store.get_job(job.id, now=clock.now)):
            assert seen is not None
            assert seen.id == job.id
            assert seen.status is JobStatus.PROCESSING
            assert seen.worker_id == "w1"
            assert seen.lease_until == pytest.approx(clock.now + 30)
            assert seen.attempts == 1
            assert seen.started_at == pytest.approx(clock.now)
            assert seen.queue_time_s == pytest.approx(2.0)
            assert seen.request == job.request

    def test_claim_only_given_slugs(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        fast = make_job(key, clock, slug="qwen-image-fast")
        store.submit(make_job(key, clock, slug="qwen-image"), rpm=0, now=clock.now)
        store.submit(fast, rpm=0, now=clock.now)
        claimed = store.claim(
            "w1", slugs=["qwen-image-fast"], lease_s=30, max_attempts=3, now=clock.now, limit=5
        )
        assert [j.id for j in claimed] == [fast.id]
        assert store.claim("w1", slugs=[], lease_s=30, max_attempts=3, now=clock.now) == []
        rest = store.claim(
            "w2", slugs={"qwen-image", "qwen-image-2512"}, lease_s=30, max_attempts=3, now=clock.now
        )
        assert [j.slug for j in rest] == ["qwen-image"]

    def test_claim_limit(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        for _ in range(5):
            store.submit(make_job(key, clock), rpm=0, now=clock.now)
        first = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=3)
        second = store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=3)
        assert len(first) == 3
        assert len(second) == 2
        assert not {j.id for j in first} & {j.id for j in second}
        assert all(j.worker_id == "w2" for j in second)

    def test_claimed_job_is_not_claimed_again_during_its_lease(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock)
        store.submit(make_job(key, clock), rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=30) is not None
        clock.advance(29.5)
        assert claim_one(store, clock, "w2") is None

    def test_expired_lease_is_reclaimed(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        first = claim_one(store, clock, "w1", lease_s=30)
        assert first is not None
        started = first.started_at
        clock.advance(31)
        second = claim_one(store, clock, "w2", lease_s=30)
        assert second is not None
        assert second.id == job.id
        assert second.worker_id == "w2"
        assert second.attempts == 2
        assert second.started_at == started
        assert second.lease_until == pytest.approx(clock.now + 30)

    def test_job_fails_after_max_attempts(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.4)
        store.submit(job, rpm=0, now=clock.now)
        for attempt in (1, 2):
            claimed = claim_one(store, clock, f"w{attempt}", lease_s=10, max_attempts=2)
            assert claimed is not None and claimed.attempts == attempt
            clock.advance(11)
        assert balance(store, key) == pytest.approx(0.6)
        assert claim_one(store, clock, "w3", lease_s=10, max_attempts=2) is None
        failed = store.get_job(job.id, now=clock.now)
        assert failed is not None
        assert failed.status is JobStatus.FAILED
        assert failed.error is not None and "attempts" in failed.error
        assert failed.error_kind
        assert failed.finished_at == pytest.approx(clock.now)
        assert balance(store, key) == pytest.approx(1.0)
        # the owner of the last attempt can no longer finish it
        assert store.complete(job.id, "w2", make_result(), now=clock.now) is None

    def test_exhausted_job_does_not_hide_runnable_ones(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        doomed = make_job(key, clock)
        store.submit(doomed, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10, max_attempts=1) is not None
        clock.advance(1)
        fresh = make_job(key, clock)
        store.submit(fresh, rpm=0, now=clock.now)
        clock.advance(10)
        claimed = claim_one(store, clock, "w2", lease_s=10, max_attempts=1)
        assert claimed is not None and claimed.id == fresh.id
        gone = store.get_job(doomed.id, now=clock.now)
        assert gone is not None and gone.status is JobStatus.FAILED

    # --- lease renewal (a heartbeat without progress) ------------------------------------------
    def test_heartbeat_renews_the_lease(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=30) is not None
        clock.advance(20)
        assert renewed(store, job.id, "w1", clock) is True
        held = store.get_job(job.id, now=clock.now)
        assert held is not None and held.lease_until == pytest.approx(clock.now + 30)
        clock.advance(20)  # past the first lease, inside the renewed one
        assert claim_one(store, clock, "w2") is None
        assert renewed(store, job.id, "w2", clock) is False
        assert renewed(store, "no-such-job", "w1", clock) is False

    def test_heartbeat_of_an_ended_or_reclaimed_job(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        done = make_job(key, clock)
        lost = make_job(key, clock)
        store.submit(done, rpm=0, now=clock.now)
        store.submit(lost, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=30) is not None
        assert claim_one(store, clock, "w1", lease_s=30) is not None
        assert store.complete(done.id, "w1", make_result(), now=clock.now)
        assert renewed(store, done.id, "w1", clock) is False
        clock.advance(31)
        assert claim_one(store, clock, "w2") is not None
        assert renewed(store, lost.id, "w1", clock) is False
        assert renewed(store, lost.id, "w2", clock) is True

    # --- complete ----------------------------------------------------------------------------
    def test_complete_round_trips_the_result(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1") is not None
        clock.advance(5)
        result = make_result(seed=42)
        assert store.complete(job.id, "w1", result, now=clock.now) is not None
        got = store.get_job(job.id, now=clock.now)
        assert got is not None
        assert got.status is JobStatus.COMPLETED
        assert got.result == result
        assert got.finished_at == pytest.approx(clock.now)
        assert got.error is None
        assert got.request == job.request

    def test_complete_only_once_and_only_by_owner(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1") is not None
        assert store.complete(job.id, "w2", make_result(), now=clock.now) is None
        assert store.complete(job.id, "w1", make_result(1), now=clock.now) is not None
        assert store.complete(job.id, "w1", make_result(2), now=clock.now) is None
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.result == make_result(1)
        assert store.complete("no-such-job", "w1", make_result(), now=clock.now) is None

    def test_complete_of_queued_job_is_refused(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert store.complete(job.id, "w1", make_result(), now=clock.now) is None
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.status is JobStatus.QUEUED

    def test_complete_after_reclaim_is_refused(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        clock.advance(11)
        assert claim_one(store, clock, "w2", lease_s=10) is not None
        assert store.complete(job.id, "w1", make_result(1), now=clock.now) is None
        assert store.complete(job.id, "w2", make_result(2), now=clock.now) is not None
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.result == make_result(2)

    # --- fail --------------------------------------------------------------------------------
    def test_fail_refunds_exactly_once(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.25)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1") is not None
        assert balance(store, key) == pytest.approx(0.75)
        clock.advance(3)
        applied = store.fail(
            job.id, "w1", kind="InferenceError", message="CUDA out of memory", now=clock.now
        )
        assert applied is not None
        assert balance(store, key) == pytest.approx(1.0)
        again = store.fail(job.id, "w1", kind="InferenceError", message="again", now=clock.now)
        assert again is None
        assert store.fail(job.id, None, kind="InferenceError", message="x", now=clock.now) is None
        assert balance(store, key) == pytest.approx(1.0)
        got = store.get_job(job.id, now=clock.now)
        assert got is not None
        assert got.status is JobStatus.FAILED
        assert got.error == "CUDA out of memory"
        assert got.error_kind == "InferenceError"
        assert got.finished_at == pytest.approx(clock.now)
        assert got.result is None

    def test_fail_by_another_worker_is_refused(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.5)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1") is not None
        assert store.fail(job.id, "w2", kind="InferenceError", message="x", now=clock.now) is None
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.status is JobStatus.PROCESSING
        assert balance(store, key) == pytest.approx(0.5)

    def test_fail_without_worker_fails_a_queued_job(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.5)
        store.submit(job, rpm=0, now=clock.now)
        applied = store.fail(
            job.id, None, kind="UpstreamError", message="image: answered 404", now=clock.now
        )
        assert applied is not None
        assert balance(store, key) == pytest.approx(1.0)
        got = store.get_job(job.id, now=clock.now)
        assert got is not None
        assert got.status is JobStatus.FAILED
        assert got.error_kind == "UpstreamError"
        assert got.error == "image: answered 404"
        assert got.cost_usd == 0, "refunded: the job's cost is what it is charged now"
        assert claim_one(store, clock, "w1") is None

    def test_fail_after_complete_is_refused(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.5)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1") is not None
        assert store.complete(job.id, "w1", make_result(), now=clock.now)
        assert store.fail(job.id, None, kind="InferenceError", message="x", now=clock.now) is None
        assert balance(store, key) == pytest.approx(0.5)
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.status is JobStatus.COMPLETED

    # --- release and expire_leases -----------------------------------------------------------
    def test_release_requeues_and_gives_the_attempt_back(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.5)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=30) is not None
        assert store.release(job.id, "w2", now=clock.now) is None
        assert store.release(job.id, "w1", now=clock.now) is not None
        got = store.get_job(job.id, now=clock.now)
        assert got is not None
        assert got.status is JobStatus.QUEUED
        assert got.attempts == 0
        assert got.worker_id is None
        assert got.lease_until is None
        assert balance(store, key) == pytest.approx(0.5)  # still paid for: it will run
        again = claim_one(store, clock, "w2")
        assert again is not None and again.id == job.id and again.attempts == 1
        assert store.release(job.id, "w1", now=clock.now) is None

    def test_release_keeps_earlier_attempts(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        clock.advance(11)
        assert claim_one(store, clock, "w2", lease_s=10) is not None
        assert store.release(job.id, "w2", now=clock.now) is not None
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.attempts == 1

    def test_expire_leases_makes_jobs_claimable_now(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        jobs = [make_job(key, clock) for _ in range(3)]
        for job in jobs:
            store.submit(job, rpm=0, now=clock.now)
        claimed = store.claim("w1", slugs=None, lease_s=600, max_attempts=3, now=clock.now, limit=2)
        assert len(claimed) == 2
        assert store.expire_leases(now=clock.now) == 2
        retaken = store.claim("w2", slugs=None, lease_s=600, max_attempts=3, now=clock.now, limit=5)
        assert [j.id for j in retaken] == [j.id for j in jobs]
        assert [j.attempts for j in retaken] == [2, 2, 1]
        assert store.expire_leases(now=clock.now) == 3
        assert store.complete(jobs[0].id, "w1", make_result(), now=clock.now) is None

    # --- purge and stats ---------------------------------------------------------------------
    def test_purge_expired(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        short = make_job(key, clock, ttl_s=60)
        long = make_job(key, clock, ttl_s=600)
        store.submit(short, rpm=0, now=clock.now)
        store.submit(long, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1") is not None
        assert store.complete(short.id, "w1", make_result(3), now=clock.now)
        assert store.purge_expired(now=clock.now) == []
        clock.advance(61)
        purged = store.purge_expired(now=clock.now)
        assert [j.id for j in purged] == [short.id]
        assert purged[0].result == make_result(3)
        assert store.purge_expired(now=clock.now) == []
        assert store.get_job(short.id, now=clock.now) is None
        assert store.get_job(long.id, now=clock.now) is not None

    def test_purge_refunds_jobs_that_never_ran(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        queued = make_job(key, clock, ttl_s=60, cost_usd=0.25)
        running = make_job(key, clock, ttl_s=60, cost_usd=0.25)
        store.submit(queued, rpm=0, now=clock.now)
        store.submit(running, rpm=0, now=clock.now)
        assert balance(store, key) == pytest.approx(0.5)
        assert claim_one(store, clock, "w1") is not None
        clock.advance(61)
        purged = store.purge_expired(now=clock.now)
        assert sorted(j.id for j in purged) == sorted([queued.id, running.id])
        assert balance(store, key) == pytest.approx(1.0)

    def test_stats(self, store: Store, clock: Clock) -> None:
        empty = store.stats(now=clock.now)
        assert sum(empty.queued_by_model.values()) == 0
        assert sum(empty.processing_by_model.values()) == 0
        assert empty.oldest_queued_age_s is None
        key = make_key(store, clock)
        for slug in ("qwen-image", "qwen-image", "qwen-image-fast", "qwen-image-fast"):
            store.submit(make_job(key, clock, slug=slug), rpm=0, now=clock.now)
            clock.advance(1)
        store.claim("w1", slugs=["qwen-image-fast"], lease_s=30, max_attempts=3, now=clock.now)
        clock.advance(10)
        stats = store.stats(now=clock.now)
        assert {k: v for k, v in stats.queued_by_model.items() if v} == {
            "qwen-image": 2,
            "qwen-image-fast": 1,
        }
        assert {k: v for k, v in stats.processing_by_model.items() if v} == {"qwen-image-fast": 1}
        assert stats.oldest_queued_age_s == pytest.approx(14.0)

    def test_stats_count_claimed_jobs_without_progress_as_waiting(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock)
        for _ in range(3):
            store.submit(make_job(key, clock, slug="qwen-image-fast"), rpm=0, now=clock.now)
        running, ahead = store.claim(
            "w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=2
        )
        assert store.stats(now=clock.now).waiting_by_model == {"qwen-image-fast": 2}
        # The worker starts one: its progress is reported; the other still waits its turn.
        store.heartbeat(
            "w1", {running.id: Progress(0, 8), ahead.id: None}, lease_s=30, now=clock.now
        )
        stats = store.stats(now=clock.now)
        assert stats.waiting_by_model == {"qwen-image-fast": 1}
        assert {k: v for k, v in stats.processing_by_model.items() if v} == {"qwen-image-fast": 2}
        assert {k: v for k, v in stats.queued_by_model.items() if v} == {"qwen-image-fast": 1}

    # --- concurrency -------------------------------------------------------------------------
    def test_concurrent_submits_never_overspend(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=3.7)
        jobs = [make_job(key, clock, cost_usd=0.1) for _ in range(100)]
        accepted: list[str] = []
        refused: list[str] = []
        lock = threading.Lock()

        def submit(job: Job) -> None:
            try:
                store.submit(job, rpm=0, now=clock.now)
            except InsufficientCredits:
                with lock:
                    refused.append(job.id)
            else:
                with lock:
                    accepted.append(job.id)

        run_in_threads(8, [lambda job=job: submit(job) for job in jobs])
        assert len(accepted) == 37
        assert len(refused) == 63
        assert balance(store, key) == pytest.approx(0.0, abs=1e-9)
        queued = store.stats(now=clock.now).queued_by_model.get("qwen-image", 0)
        assert queued == 37

    def test_concurrent_rate_limit_is_exact(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=100.0, rpm=10)
        admitted: list[int] = []
        lock = threading.Lock()

        def submit() -> None:
            try:
                store.submit(make_job(key, clock), rpm=10, now=clock.now)
            except RateLimited:
                return
            with lock:
                admitted.append(1)

        run_in_threads(8, [submit] * 40)
        assert len(admitted) == 10
        assert balance(store, key) == pytest.approx(99.0, abs=1e-9)

    def test_concurrent_claims_take_each_job_once(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        ids = set()
        for _ in range(50):
            job = make_job(key, clock)
            store.submit(job, rpm=0, now=clock.now)
            ids.add(job.id)
        taken: list[tuple[str, str]] = []
        lock = threading.Lock()

        def drain(worker_id: str) -> None:
            while True:
                jobs = store.claim(
                    worker_id, slugs=None, lease_s=60, max_attempts=3, now=clock.now, limit=2
                )
                if not jobs:
                    return
                with lock:
                    taken.extend((job.id, worker_id) for job in jobs)

        run_in_threads(20, [lambda w=f"w{i}": drain(w) for i in range(20)])
        taken_ids = [job_id for job_id, _ in taken]
        assert len(taken_ids) == 50
        assert set(taken_ids) == ids
        for job_id, worker_id in taken:
            got = store.get_job(job_id, now=clock.now)
            assert got is not None and got.worker_id == worker_id and got.attempts == 1

    # --- heartbeat and progress --------------------------------------------------------------
    def test_heartbeat_renews_records_progress_and_reports_lost_and_cancelled(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock)
        running, stopping, done = (make_job(key, clock) for _ in range(3))
        for job in (running, stopping, done):
            store.submit(job, rpm=0, now=clock.now)
        claimed = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=3)
        assert len(claimed) == 3
        assert store.complete(done.id, "w1", make_result(), now=clock.now)
        store.cancel(stopping.id, key.id, now=clock.now)
        clock.advance(20)
        beat = store.heartbeat(
            "w1",
            {
                running.id: Progress(3, 10),
                stopping.id: None,
                done.id: Progress(1, 2),
                "no-such-job": None,
            },
            lease_s=30,
            now=clock.now,
        )
        assert beat.owned == {running.id, stopping.id}
        assert beat.cancelled == {stopping.id}
        assert beat.lost == {done.id, "no-such-job"}
        got = store.get_job(running.id, now=clock.now)
        assert got is not None
        assert got.lease_until == pytest.approx(clock.now + 30)
        assert got.progress == JobProgress(3, 10, updated_at=clock.now)
        assert got.progress.fraction == pytest.approx(0.3)
        stopped = store.get_job(stopping.id, now=clock.now)
        assert stopped is not None and stopped.progress is None
        assert stopped.lease_until == pytest.approx(clock.now + 30)
        finished = store.get_job(done.id, now=clock.now)
        assert finished is not None and finished.progress is None  # a lost job records nothing
        # renewed: past the first lease, inside the new one, nobody can take them
        clock.advance(20)
        assert store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now) == []
        # another worker's heartbeat neither renews nor records
        other = store.heartbeat("w2", {running.id: Progress(9, 10)}, lease_s=30, now=clock.now)
        assert other.owned == frozenset() and other.lost == {running.id}
        # no news keeps the last report
        assert store.heartbeat("w1", {running.id: None}, lease_s=30, now=clock.now).owned
        kept = store.get_job(running.id, now=clock.now)
        assert kept is not None
        assert kept.progress == JobProgress(3, 10, updated_at=clock.now - 20)

    def test_heartbeat_of_nothing_and_of_a_reclaimed_job(self, store: Store, clock: Clock) -> None:
        empty = store.heartbeat("w1", {}, lease_s=30, now=clock.now)
        assert empty.owned == empty.cancelled == empty.lost == frozenset()
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        clock.advance(11)
        assert claim_one(store, clock, "w2", lease_s=10) is not None
        assert store.heartbeat("w1", {job.id: Progress(5, 8)}, lease_s=10, now=clock.now).lost == {
            job.id
        }
        assert store.heartbeat("w2", {job.id: Progress(2, 8)}, lease_s=10, now=clock.now).owned
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.progress == JobProgress(2, 8, updated_at=clock.now)

    def test_progress_starts_over_with_each_attempt_and_stays_once_ended(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        store.heartbeat("w1", {job.id: Progress(4, 8)}, lease_s=10, now=clock.now)
        assert store.release(job.id, "w1", now=clock.now)
        released = store.get_job(job.id, now=clock.now)
        assert released is not None and released.progress is None
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        store.heartbeat("w1", {job.id: Progress(6, 8)}, lease_s=10, now=clock.now)
        clock.advance(11)  # w1 died: the next attempt starts from nothing
        retried = claim_one(store, clock, "w2", lease_s=10)
        assert retried is not None and retried.progress is None
        store.heartbeat("w2", {job.id: Progress(8, 8)}, lease_s=10, now=clock.now)
        assert store.complete(job.id, "w2", make_result(), now=clock.now)
        done = store.get_job(job.id, now=clock.now)
        assert done is not None and done.progress == JobProgress(8, 8, updated_at=clock.now)

    # --- cancel ------------------------------------------------------------------------------
    def test_cancel_of_a_queued_job_ends_it_at_once_refunded(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.25)
        store.submit(job, rpm=0, now=clock.now)
        assert balance(store, key) == pytest.approx(0.75)
        clock.advance(2)
        cancelled = store.cancel(job.id, key.id, now=clock.now).job
        assert cancelled.status is JobStatus.FAILED
        assert cancelled.error_kind == CANCELLED
        assert cancelled.error is not None and "cancelled" in cancelled.error
        assert cancelled.finished_at == pytest.approx(clock.now)
        assert store.get_job(job.id, now=clock.now) == cancelled
        assert balance(store, key) == pytest.approx(1.0)
        assert claim_one(store, clock, "w1") is None
        assert store.stats(now=clock.now).queued_by_model.get(job.slug, 0) == 0
        assert [(e.type, e.error_kind) for e in store.job_events(job.id)] == [
            (JobEventType.QUEUED, None),
            (JobEventType.FAILED, CANCELLED),
        ]
        with pytest.raises(Conflict) as caught:
            store.cancel(job.id, key.id, now=clock.now)
        assert caught.value.job_status == JobStatus.FAILED
        assert balance(store, key) == pytest.approx(1.0)

    def test_cancel_of_a_running_job_is_answered_by_the_heartbeat(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.25)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=30) is not None
        clock.advance(1)
        requested = store.cancel(job.id, key.id, now=clock.now).job
        assert requested.status is JobStatus.PROCESSING
        assert requested.cancel_requested_at == pytest.approx(clock.now)
        assert balance(store, key) == pytest.approx(0.75)  # not refunded until it stops
        clock.advance(1)
        again = store.cancel(job.id, key.id, now=clock.now).job  # idempotent while pending
        assert again.cancel_requested_at == requested.cancel_requested_at
        beat = store.heartbeat("w1", {job.id: Progress(2, 8)}, lease_s=30, now=clock.now)
        assert beat.cancelled == {job.id}
        assert store.fail(job.id, "w1", kind=CANCELLED, message="stopped", now=clock.now)
        assert balance(store, key) == pytest.approx(1.0)
        assert not store.fail(job.id, "w1", kind=CANCELLED, message="stopped", now=clock.now)
        assert balance(store, key) == pytest.approx(1.0)
        ended = store.get_job(job.id, now=clock.now)
        assert ended is not None and ended.status is JobStatus.FAILED
        assert ended.error_kind == CANCELLED
        assert [e.type for e in store.job_events(job.id)] == [
            JobEventType.QUEUED,
            JobEventType.PROCESSING,
            JobEventType.CANCEL_REQUESTED,
            JobEventType.FAILED,
        ]
        with pytest.raises(Conflict):
            store.cancel(job.id, key.id, now=clock.now)

    def test_cancel_of_a_finished_job_is_a_conflict(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        done, broken = make_job(key, clock, cost_usd=0.25), make_job(key, clock, cost_usd=0.25)
        store.submit(done, rpm=0, now=clock.now)
        store.submit(broken, rpm=0, now=clock.now)
        store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=2)
        assert store.complete(done.id, "w1", make_result(), now=clock.now)
        assert store.fail(broken.id, "w1", kind="InferenceError", message="x", now=clock.now)
        for job, status in ((done, JobStatus.COMPLETED), (broken, JobStatus.FAILED)):
            with pytest.raises(Conflict) as caught:
                store.cancel(job.id, key.id, now=clock.now)
            assert caught.value.job_status == status
            assert caught.value.http_status == 409
        assert balance(store, key) == pytest.approx(0.75)
        got = store.get_job(done.id, now=clock.now)
        assert got is not None and got.status is JobStatus.COMPLETED

    def test_cancel_of_another_keys_unknown_or_expired_job_is_unknown(
        self, store: Store, clock: Clock
    ) -> None:
        owner, stranger = make_key(store, clock), make_key(store, clock)
        job = make_job(owner, clock, ttl_s=100)
        store.submit(job, rpm=0, now=clock.now)
        with pytest.raises(UnknownRequest):
            store.cancel(job.id, stranger.id, now=clock.now)
        with pytest.raises(UnknownRequest):
            store.cancel("no-such-job", owner.id, now=clock.now)
        got = store.get_job(job.id, now=clock.now)
        assert got is not None and got.status is JobStatus.QUEUED
        assert got.cancel_requested_at is None
        assert [e.type for e in store.job_events(job.id)] == [JobEventType.QUEUED]
        clock.advance(100)
        with pytest.raises(UnknownRequest):
            store.cancel(job.id, owner.id, now=clock.now)

    def test_cancelled_job_whose_worker_is_lost_ends_instead_of_running_again(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.25)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        store.cancel(job.id, key.id, now=clock.now)
        clock.advance(11)  # w1 died before it saw the request
        assert claim_one(store, clock, "w2", lease_s=10) is None
        ended = store.get_job(job.id, now=clock.now)
        assert ended is not None and ended.status is JobStatus.FAILED
        assert ended.error_kind == CANCELLED and ended.attempts == 1
        assert balance(store, key) == pytest.approx(1.0)
        assert not store.fail(job.id, "w1", kind=CANCELLED, message="late", now=clock.now)
        assert balance(store, key) == pytest.approx(1.0)

    def test_cancel_after_the_lease_ran_out_ends_at_once(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.25)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        clock.advance(11)
        ended = store.cancel(job.id, key.id, now=clock.now).job
        assert ended.status is JobStatus.FAILED and ended.error_kind == CANCELLED
        assert balance(store, key) == pytest.approx(1.0)
        terminal = [e for e in store.job_events(job.id) if e.type.is_terminal]
        assert len(terminal) == 1

    def test_released_cancelled_job_ends_and_a_released_job_can_be_cancelled(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        stopping, waiting = make_job(key, clock, cost_usd=0.25), make_job(key, clock, cost_usd=0.25)
        store.submit(stopping, rpm=0, now=clock.now)
        store.submit(waiting, rpm=0, now=clock.now)
        store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=2)
        store.cancel(stopping.id, key.id, now=clock.now)
        assert store.release(stopping.id, "w1", now=clock.now)  # worker shuts down
        ended = store.get_job(stopping.id, now=clock.now)
        assert ended is not None and ended.status is JobStatus.FAILED
        assert ended.error_kind == CANCELLED
        assert store.release(waiting.id, "w1", now=clock.now)
        assert store.cancel(waiting.id, key.id, now=clock.now).job.status is JobStatus.FAILED
        assert balance(store, key) == pytest.approx(1.0)
        assert claim_one(store, clock, "w2") is None
        assert store.stats(now=clock.now).queued_by_model.get(waiting.slug, 0) == 0

    def test_a_worker_that_finishes_before_it_sees_the_cancel_completes(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        job = make_job(key, clock, cost_usd=0.25)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1") is not None
        store.cancel(job.id, key.id, now=clock.now)
        assert store.complete(job.id, "w1", make_result(), now=clock.now)
        done = store.get_job(job.id, now=clock.now)
        assert done is not None and done.status is JobStatus.COMPLETED
        assert balance(store, key) == pytest.approx(0.75)  # it ran, so it is paid for

    # --- the event log -----------------------------------------------------------------------
    def test_every_ending_is_announced_exactly_once(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=10.0)
        jobs = {name: make_job(key, clock, ttl_s=600) for name in ("done", "broken", "queued")}
        jobs["running"] = make_job(key, clock, ttl_s=600)
        jobs["lost"] = make_job(key, clock, ttl_s=600)
        jobs["expired_running"] = make_job(key, clock, ttl_s=60)
        jobs["expired_queued"] = make_job(key, clock, ttl_s=60)
        for job in jobs.values():
            store.submit(job, rpm=0, now=clock.now)
            clock.advance(0.001)
        names = {job.id: name for name, job in jobs.items()}
        batch = store.claim("w1", slugs=None, lease_s=10, max_attempts=1, now=clock.now, limit=2)
        assert [names[j.id] for j in batch] == ["done", "broken"]
        assert store.complete(jobs["done"].id, "w1", make_result(), now=clock.now)
        assert store.fail(
            jobs["broken"].id, "w1", kind="InferenceError", message="boom", now=clock.now
        )
        store.cancel(jobs["queued"].id, key.id, now=clock.now)
        store.claim("w1", slugs=None, lease_s=10, max_attempts=1, now=clock.now, limit=2)
        store.cancel(jobs["running"].id, key.id, now=clock.now)
        assert store.fail(jobs["running"].id, "w1", kind=CANCELLED, message="stop", now=clock.now)
        clock.advance(11)  # "lost" exhausts its one attempt
        assert [
            names[j.id]
            for j in store.claim("w2", slugs=None, lease_s=100, max_attempts=1, now=clock.now)
        ] == ["expired_running"]
        clock.advance(60)  # the two short-lived jobs expire unfinished
        store.purge_expired(now=clock.now)
        endings: dict[str, list[tuple[JobEventType, str | None]]] = {}
        for event in store.events(after=None, limit=1000):
            if event.type.is_terminal:
                endings.setdefault(names[event.job_id], []).append((event.type, event.error_kind))
        assert endings == {
            "done": [(JobEventType.COMPLETED, None)],
            "broken": [(JobEventType.FAILED, "InferenceError")],
            "queued": [(JobEventType.FAILED, CANCELLED)],
            "running": [(JobEventType.FAILED, CANCELLED)],
            "lost": [(JobEventType.FAILED, "InferenceError")],
            "expired_running": [(JobEventType.FAILED, EXPIRED)],
            "expired_queued": [(JobEventType.FAILED, EXPIRED)],
        }

    def test_events_carry_the_job_and_resume_after_an_id(self, store: Store, clock: Clock) -> None:
        assert store.events(after=None, limit=10) == []
        assert store.last_event_id() is None
        key = make_key(store, clock)
        first, second = make_job(key, clock, slug="qwen-image"), make_job(key, clock, slug="fast")
        store.submit(first, rpm=0, now=clock.now)
        clock.advance(1)
        store.submit(second, rpm=0, now=clock.now)
        clock.advance(1)
        assert claim_one(store, clock, "w1", slugs=["qwen-image"]) is not None
        clock.advance(1)
        assert store.complete(first.id, "w1", make_result(), now=clock.now)
        every = store.events(after=None, limit=100)
        assert [(e.job_id, e.type) for e in every] == [
            (first.id, JobEventType.QUEUED),
            (second.id, JobEventType.QUEUED),
            (first.id, JobEventType.PROCESSING),
            (first.id, JobEventType.COMPLETED),
        ]
        processing = every[2]
        assert processing == JobEvent(
            id=processing.id,
            job_id=first.id,
            key_id=key.id,
            slug="qwen-image",
            type=JobEventType.PROCESSING,
            at=START_S + 2,
            attempt=1,
        )
        assert len({e.id for e in every}) == 4
        assert store.last_event_id() == every[-1].id
        # paged reading sees each event once, in order
        paged: list[JobEvent] = []
        after: str | None = None
        while page := store.events(after=after, limit=3):
            paged += page
            after = page[-1].id
        assert paged == every
        assert store.events(after=every[-1].id, limit=10) == []
        assert store.job_events(first.id) == [every[0], every[2], every[3]]
        assert store.job_events(first.id, after=every[0].id) == [every[2], every[3]]
        assert store.job_events(second.id) == [every[1]]
        assert store.job_events("no-such-job") == []
        with pytest.raises(InvalidRequest):
            store.events(after="not an id", limit=10)
        with pytest.raises(InvalidRequest):
            store.job_events(first.id, after="not an id")

    def test_release_and_retry_are_announced(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        assert store.release(job.id, "w1", now=clock.now)
        assert claim_one(store, clock, "w1", lease_s=10) is not None
        clock.advance(11)
        assert claim_one(store, clock, "w2", lease_s=10) is not None
        assert [(e.type, e.attempt) for e in store.job_events(job.id)] == [
            (JobEventType.QUEUED, 0),
            (JobEventType.PROCESSING, 1),
            (JobEventType.QUEUED, 0),
            (JobEventType.PROCESSING, 1),
            (JobEventType.PROCESSING, 2),
        ]

    def test_refused_or_unapplied_changes_announce_nothing(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=0.05)
        with pytest.raises(InsufficientCredits):
            store.submit(make_job(key, clock, cost_usd=0.1), rpm=0, now=clock.now)
        job = make_job(key, clock, cost_usd=0.0)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1") is not None
        assert not store.complete(job.id, "w2", make_result(), now=clock.now)
        assert not store.fail(job.id, "w2", kind="InferenceError", message="x", now=clock.now)
        assert not store.release(job.id, "w2", now=clock.now)
        assert [e.type for e in store.events(after=None, limit=10)] == [
            JobEventType.QUEUED,
            JobEventType.PROCESSING,
        ]

    def test_event_log_is_trimmed_with_the_result_ttl(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        kept = make_job(key, clock, ttl_s=600)
        done, stale = make_job(key, clock, ttl_s=60), make_job(key, clock, ttl_s=60)
        for job in (kept, done, stale):
            store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, "w1", slugs=None) is not None  # kept
        assert claim_one(store, clock, "w1") is not None  # done
        assert store.complete(done.id, "w1", make_result(), now=clock.now)
        clock.advance(59)
        store.purge_expired(now=clock.now)
        assert len(store.events(after=None, limit=100)) == 6  # none is a TTL old yet
        clock.advance(2)
        store.purge_expired(now=clock.now)
        # what happened a (60 s) TTL ago is gone, the longer-lived job's events stay, and the
        # announcement that `stale` expired stays a TTL from now
        left = store.events(after=None, limit=100)
        assert [(e.job_id, e.type, e.error_kind) for e in left] == [
            (kept.id, JobEventType.QUEUED, None),
            (kept.id, JobEventType.PROCESSING, None),
            (stale.id, JobEventType.FAILED, EXPIRED),
        ]
        assert store.job_events(done.id) == []
        assert store.job_events(stale.id) == left[2:]
        last = store.last_event_id()
        assert last == left[2].id
        clock.advance(61)
        store.purge_expired(now=clock.now)
        assert store.events(after=None, limit=100) == left[:2]
        # ids keep growing after the newest events were trimmed: a reader resuming misses nothing
        fresh = make_job(key, clock)
        store.submit(fresh, rpm=0, now=clock.now)
        assert [e.job_id for e in store.events(after=last, limit=10)] == [fresh.id]

    # --- queue position ----------------------------------------------------------------------
    def test_queue_position_per_model(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        order = ["a1", "b1", "a2", "b2", "a3"]
        jobs = {
            name: make_job(key, clock, slug="qwen-image" if name[0] == "a" else "qwen-image-fast")
            for name in order
        }
        for name in order:
            store.submit(jobs[name], rpm=0, now=clock.now)
            clock.advance(1)

        def positions() -> dict[str, int | None]:
            return {name: store.queue_position(jobs[name].id, now=clock.now) for name in order}

        assert positions() == {"a1": 0, "b1": 0, "a2": 1, "b2": 1, "a3": 2}
        claimed = claim_one(store, clock, "w1", slugs=["qwen-image"])
        assert claimed is not None and claimed.id == jobs["a1"].id
        assert positions() == {"a1": None, "b1": 0, "a2": 0, "b2": 1, "a3": 1}
        assert store.release(jobs["a1"].id, "w1", now=clock.now)  # back in its old place
        assert positions() == {"a1": 0, "b1": 0, "a2": 1, "b2": 1, "a3": 2}
        store.cancel(jobs["a2"].id, key.id, now=clock.now)
        assert positions() == {"a1": 0, "b1": 0, "a2": None, "b2": 1, "a3": 1}
        assert store.queue_position("no-such-job", now=clock.now) is None
        clock.advance(TTL_S)
        assert store.queue_position(jobs["a3"].id, now=clock.now) is None


def run_in_threads(threads: int, tasks: list[Callable[[], None]]) -> None:
    """Run every task on a pool of ``threads``, re-raising the first error."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(task) for task in tasks]
        for future in futures:
            error = future.exception(timeout=60)
            if error is not None:
                raise error


__all__ = ["START_S", "Clock", "StoreContract", "make_job", "make_key"]
