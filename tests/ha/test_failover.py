"""A Sentinel failover as the store sees it, with real servers: the clients that the one
connector makes find the promoted replica on their own, reload their Lua scripts there, the
pub/sub subscribers resubscribe, and meanwhile every call fails as ``StoreUnavailable`` (503).
With ``MIN_REPLICAS`` a submit is answered only once a replica holds it, and one that no replica
confirms is withdrawn, refunded, and may be sent again."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from qwenserve.accounts.keys import create_api_key
from qwenserve.api.app import create_app
from qwenserve.api.services import Services
from qwenserve.backends import open_backend
from qwenserve.catalog import MODELS
from qwenserve.config import Settings
from qwenserve.errors import NotReplicated, StoreUnavailable
from qwenserve.jobs import JobStatus
from qwenserve.media.redis_storage import RedisMediaStore
from qwenserve.media.storage import LocalMediaStore, new_media_id
from qwenserve.store import rules
from qwenserve.store.base import Idempotency
from qwenserve.store.redis import RedisStore
from qwenserve.store.redis.replication import NOT_REPLICATED_KIND
from tests.ha.sentinels import SentinelCluster
from tests.redis_server import needs_redis
from tests.service.helpers import body_for
from tests.store.contract import Clock, make_job, make_key, make_result

pytestmark = [pytest.mark.redis, needs_redis]

HEAR_TIMEOUT_S = 30.0


def _raw(port: int | None) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True)


def _balance(store: RedisStore, key_id: str) -> int:
    return int(store._redis.hget(store.keys.api_key(key_id), "balance_micro"))  # type: ignore[arg-type]


def test_an_accepted_submit_is_on_the_replica_before_its_answer(
    replica_cluster: SentinelCluster,
) -> None:
    clock = Clock()
    backend = open_backend(Settings(store=replica_cluster.url, redis_min_replicas=1))
    try:
        store = backend.store
        assert isinstance(store, RedisStore)
        job = make_job(make_key(store, clock), clock)
        store.submit(job, rpm=0, now=clock.now)
        # Read straight from the replica, at once: WAIT returned only after it had the job.
        assert replica_cluster.replica is not None
        replica = _raw(replica_cluster.replica.port)
        try:
            assert replica.hget(store.keys.job(job.id), "status") == "QUEUED"
        finally:
            replica.close()
    finally:
        backend.close()


def test_after_the_primary_is_killed_the_store_503s_then_carries_on_on_the_new_one(
    sentinel_cluster: SentinelCluster,
) -> None:
    clock = Clock()
    backend = open_backend(Settings(store=sentinel_cluster.url, redis_min_replicas=1))
    store = backend.store
    assert isinstance(store, RedisStore)
    heard: queue.Queue[str | None] = queue.Queue()
    subscriber = backend.signals.on_queued(heard.put)
    try:
        key = make_key(store, clock)
        before = make_job(key, clock)
        store.submit(before, rpm=0, now=clock.now)
        old = sentinel_cluster.kill_primary()
        # The window: calls keep coming until the Sentinels name the new primary. Each one
        # answers or fails as a typed 503 (the client's retries may bridge the window), never
        # with a raw Redis error.
        outcomes: list[str] = []
        failover = threading.Thread(target=sentinel_cluster.wait_for_failover, args=(old,))
        failover.start()
        while failover.is_alive():
            try:
                store.get_job(before.id, now=clock.now)
                outcomes.append("answered")
            except StoreUnavailable as unavailable:
                assert unavailable.http_status == 503 and unavailable.retry_after_s
                outcomes.append("503")
        failover.join()
        assert outcomes, "no call during the window"
        promoted = sentinel_cluster.current_primary()
        assert promoted is not old
        # The promoted replica has the data but not the script cache: the first script call
        # meets NOSCRIPT and loads it again (the scripts are sent by SHA).
        raw = _raw(promoted.port)
        sha = store._scripts.claim.sha
        assert raw.script_exists(sha) == [False]
        # The job accepted before the kill survived it, and work goes on: claim it.
        assert store.get_job(before.id, now=clock.now) is not None
        claimed = store.claim("w1", slugs=None, lease_s=60, max_attempts=3, now=clock.now)
        assert [j.id for j in claimed] == [before.id]
        assert raw.script_exists(sha) == [True]
        # The wake-up subscriber reconnected to the new primary on its own: it hears a submit.
        while not heard.empty():
            heard.get_nowait()
        sentinel_cluster.restart_as_replica(old)  # MIN_REPLICAS=1 needs a replica again
        after = make_job(key, clock)
        deadline = time.monotonic() + HEAR_TIMEOUT_S
        while True:  # the subscriber may still be backing off: submit until it hears one
            try:
                store.submit(after, rpm=0, now=clock.now)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        slug = heard.get(timeout=HEAR_TIMEOUT_S)
        while slug is None:  # the look-again call after each (re)subscription
            slug = heard.get(timeout=HEAR_TIMEOUT_S)
        assert slug == after.slug
        raw.close()
    finally:
        subscriber.close()
        backend.close()


def test_a_submit_no_replica_confirms_is_withdrawn_refunded_and_may_be_sent_again(
    replica_cluster: SentinelCluster,
) -> None:
    clock = Clock()
    store = RedisStore.from_url(replica_cluster.url, min_replicas=1)
    try:
        key = make_key(store, clock, balance_usd=1.0)
        balance = _balance(store, key.id)
        assert replica_cluster.replica is not None
        replica_cluster.replica.kill()  # no replica can confirm anything now
        job = make_job(key, clock)
        idempotency = Idempotency(key="retry-me", body_hash="h1")
        with pytest.raises(NotReplicated) as refused:
            store.submit(job, rpm=0, now=clock.now, idempotency=idempotency)
        assert refused.value.http_status == 503 and refused.value.retry_after_s
        # Nothing charged, nothing queued: the job failed as withdrawn, refunded.
        assert _balance(store, key.id) == balance
        withdrawn = store.get_job(job.id, now=clock.now)
        assert withdrawn is not None and withdrawn.status is JobStatus.FAILED
        assert withdrawn.error_kind == NOT_REPLICATED_KIND
        assert not store.claim("w1", slugs=None, lease_s=60, max_attempts=3, now=clock.now)
        # The replica is back: the same request (same Idempotency-Key) is a fresh submit.
        replica_cluster.replica.start()
        again = make_job(key, clock)
        deadline = time.monotonic() + 30
        while True:
            try:
                outcome = store.submit(again, rpm=0, now=clock.now, idempotency=idempotency)
                break
            except NotReplicated:  # until the replica has caught up with the primary
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert outcome.replay_of is None
        assert _balance(store, key.id) < balance  # charged once, for the accepted one
        claimed = store.claim("w1", slugs=None, lease_s=60, max_attempts=3, now=clock.now)
        assert [j.id for j in claimed] == [again.id]
    finally:
        store.close()


def test_an_image_put_in_redis_is_on_the_replica_before_it_returns(
    replica_cluster: SentinelCluster,
) -> None:
    """Media in Redis waits like a submit: a worker completes its job only after the image put
    returned, so an image a dying primary never passed on cannot leave a COMPLETED job whose
    image 404s on the promoted replica. With no replica to confirm, the put raises (the
    worker's retry puts it again) instead of returning."""
    backend = open_backend(
        Settings(store=replica_cluster.url, redis_min_replicas=1, redis_replica_wait_s=0.3)
    )
    try:
        media = backend.media
        assert isinstance(media, RedisMediaStore)
        expires_at = time.time() + 3600
        one, two = new_media_id(), new_media_id()
        media.put(one, b"\x89PNG one", "image/png", expires_at=expires_at)
        assert replica_cluster.replica is not None
        replica = redis.Redis(port=replica_cluster.replica.port)
        try:
            assert replica.hget(media.keys.media(one), "data") == b"\x89PNG one"
            assert replica.zscore(media.keys.media_expiry(), one) == expires_at
        finally:
            replica.close()
        assert media.get(one, now=time.time()) == (b"\x89PNG one", "image/png")
        replica_cluster.replica.kill()
        with pytest.raises(StoreUnavailable) as refused:
            media.put(two, b"\x89PNG two", "image/png", expires_at=expires_at)
        assert "media store" in refused.value.message and "redis" not in refused.value.message
    finally:
        backend.close()


@pytest.mark.parametrize("with_key", [True, False], ids=["idempotency-key", "no-key"])
def test_a_job_that_completed_within_its_replica_wait_is_charged_once_or_refunded(
    replica_cluster: SentinelCluster, with_key: bool
) -> None:
    """A fast job can be claimed, run and completed while its submit still waits for a replica
    that never confirms: it cannot be withdrawn then. With an Idempotency-Key the retry the 503
    asks for is answered with that job, charged once (not a second, fresh job); without one
    nobody can find it again, so it costs nothing."""
    clock = Clock()
    store = RedisStore.from_url(replica_cluster.url, min_replicas=1)
    try:
        key = make_key(store, clock, balance_usd=1.0)
        balance = _balance(store, key.id)
        assert replica_cluster.replica is not None
        replica_cluster.replica.kill()
        job = make_job(key, clock)
        idempotency = Idempotency(key="fast-one", body_hash="h1") if with_key else None
        completed = threading.Event()

        def worker() -> None:  # runs the job as soon as the submit has queued it
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                claimed = store.claim("w1", slugs=None, lease_s=60, max_attempts=3, now=clock.now)
                if claimed:
                    assert store.complete(job.id, "w1", make_result(), now=clock.now)
                    completed.set()
                    return
                time.sleep(0.01)

        thread = threading.Thread(target=worker)
        thread.start()
        with pytest.raises(NotReplicated):
            store.submit(job, rpm=0, now=clock.now, idempotency=idempotency)
        thread.join()
        assert completed.is_set()
        ended = store.get_job(job.id, now=clock.now)
        assert ended is not None and ended.status is JobStatus.COMPLETED  # the work is done
        if idempotency is None:
            assert _balance(store, key.id) == balance  # a 503, nothing charged
            return
        assert _balance(store, key.id) == balance - rules.to_micro(job.cost_usd)
        replica_cluster.replica.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                outcome = store.submit(
                    make_job(key, clock), rpm=0, now=clock.now, idempotency=idempotency
                )
                break
            except NotReplicated:  # until the replica has caught up with the primary
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert outcome.replay_of == job.id  # the retry gets that job: one job, one charge
        assert _balance(store, key.id) == balance - rules.to_micro(job.cost_usd)
    finally:
        store.close()


async def test_the_api_answers_an_unreplicated_submit_503_with_retry_after_and_no_charge(
    replica_cluster: SentinelCluster, tmp_path: Path
) -> None:
    """Through the HTTP layer: the typed error maps to 503 + Retry-After (api/errors.py), the
    body says nothing of Redis, the balance is untouched, and a retry once a replica is back
    is accepted (the same Idempotency-Key is a fresh submit)."""
    store = RedisStore.from_url(replica_cluster.url, min_replicas=1)
    services = Services(
        settings=Settings(data_dir=tmp_path), store=store, media=LocalMediaStore(tmp_path / "m")
    )
    plaintext, _ = create_api_key(store, name="owner", credits_usd=1.0, rpm=0, now=time.time())
    headers = {"x-api-key": plaintext, "Idempotency-Key": "one-submit"}
    transport = httpx.ASGITransport(app=create_app(services))
    assert replica_cluster.replica is not None
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
            replica_cluster.replica.kill()
            refused = await http.post(
                "/v2/qwen-image-fast", json=body_for("qwen-image-fast"), headers=headers
            )
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert "redis" not in refused.text.lower()
            credits = await http.get("/v1/get-user-credits", headers=headers)
            assert credits.json()["credits"] == pytest.approx(1.0)
            replica_cluster.replica.start()
            deadline = time.monotonic() + 30
            while True:
                accepted = await http.post(
                    "/v2/qwen-image-fast", json=body_for("qwen-image-fast"), headers=headers
                )
                if accepted.status_code != 503 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert accepted.status_code == 200, accepted.text
            credits = await http.get("/v1/get-user-credits", headers=headers)
            price = MODELS["qwen-image-fast"].price_usd
            assert credits.json()["credits"] == pytest.approx(1.0 - price)
    finally:
        services.close()
        store.close()
