"""The Redis store against a real redis-server: the shared contract, plus what only Redis shows
(streams and consumer groups behind the queue, TTLs, restarts, namespaces), the worker registry
and the Redis media store."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from qwenserve.catalog import OutputSize, SizeKind
from qwenserve.errors import ServiceUnavailable, Unauthenticated
from qwenserve.jobs import JobEventType, JobStatus
from qwenserve.media.redis_storage import RedisMediaStore
from qwenserve.media.storage import new_media_id
from qwenserve.store.history import HistoryPolicy
from qwenserve.store.redis import RedisStore, RedisWorkerRegistry
from qwenserve.store.redis_keys import CONSUMER_GROUP, RedisKeys
from qwenserve.store.workers import WorkerInfo
from tests.redis_server import RedisServer
from tests.store.contract import Clock, StoreContract, make_job, make_key, make_result
from tests.store.contract_backpressure import BackpressureContract
from tests.store.contract_events import EventsContract
from tests.store.contract_fairness import FairnessContract, FairPositionContract
from tests.store.contract_history import HistoryContract
from tests.store.contract_idempotency import IdempotencyContract
from tests.store.contract_policy import PolicyContract
from tests.store.schema_v1 import v1_params

pytestmark = pytest.mark.redis


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(redis_url: str, redis_client: redis.Redis, namespace: str) -> Iterator[RedisStore]:
    opened = RedisStore.from_url(redis_url, namespace=namespace)
    yield opened
    opened.close()


class TestRedisStore(
    StoreContract,
    IdempotencyContract,
    HistoryContract,
    PolicyContract,
    BackpressureContract,
    FairnessContract,
    FairPositionContract,
    EventsContract,
):
    """Every contract test, against an emptied redis-server."""


# --- what Redis holds -------------------------------------------------------------------------
def test_queue_is_a_stream_whose_pending_entries_follow_the_owner(
    store: RedisStore, redis_client: redis.Redis, clock: Clock
) -> None:
    keys = store.keys
    key = make_key(store, clock)
    job = make_job(key, clock)
    store.submit(job, rpm=0, now=clock.now)
    stream = keys.queue(job.slug)
    assert redis_client.xlen(stream) == 1
    assert [g["name"] for g in redis_client.xinfo_groups(stream)] == [CONSUMER_GROUP]

    assert store.claim("w1", slugs=None, lease_s=10, max_attempts=3, now=clock.now)
    pending = redis_client.xpending(stream, CONSUMER_GROUP)
    assert pending["pending"] == 1
    assert pending["consumers"] == [{"name": "w1", "pending": 1}]

    clock.advance(11)  # w1 died: w2 takes the job, and the pending entry moves to w2
    assert store.claim("w2", slugs=None, lease_s=10, max_attempts=3, now=clock.now)
    owners = {
        c["name"]: c["pending"] for c in redis_client.xpending(stream, CONSUMER_GROUP)["consumers"]
    }
    assert owners.get("w2") == 1 and owners.get("w1", 0) == 0

    assert store.complete(job.id, "w2", make_result(), now=clock.now)
    assert redis_client.xlen(stream) == 0
    assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 0
    assert redis_client.zcard(keys.leases(job.slug)) == 0


def test_released_job_keeps_its_place_in_the_queue(store: RedisStore, clock: Clock) -> None:
    key = make_key(store, clock)
    first, second = make_job(key, clock), make_job(key, clock)
    store.submit(first, rpm=0, now=clock.now)
    clock.advance(1)
    store.submit(second, rpm=0, now=clock.now)
    assert [
        j.id for j in store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
    ] == [first.id]
    assert store.release(first.id, "w1", now=clock.now)
    stats = store.stats(now=clock.now)
    assert stats.queued_by_model == {"qwen-image": 2} and stats.processing_by_model == {}
    assert stats.oldest_queued_age_s == pytest.approx(1.0)
    claimed = store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=2)
    assert [j.id for j in claimed] == [first.id, second.id]


def test_event_log_is_a_stream_and_each_job_has_its_own(
    store: RedisStore, redis_client: redis.Redis, clock: Clock
) -> None:
    key = make_key(store, clock)
    job, other = make_job(key, clock, ttl_s=60), make_job(key, clock, ttl_s=600)
    store.submit(job, rpm=0, now=clock.now)
    store.submit(other, rpm=0, now=clock.now)
    assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
    assert store.complete(job.id, "w1", make_result(), now=clock.now)
    events = store.events(after=None, limit=10)
    log = [entry_id for entry_id, _ in redis_client.xrange(store.keys.events())]
    assert log == [e.id for e in events]
    own = [entry_id for entry_id, _ in redis_client.xrange(store.keys.job_events(job.id))]
    assert own == [e.id for e in events if e.job_id == job.id]
    # the job's stream lives at least as long as the job hash
    assert redis_client.pttl(store.keys.job_events(job.id)) >= redis_client.pttl(
        store.keys.job(job.id)
    )
    clock.advance(60)
    store.purge_expired(now=clock.now)
    assert redis_client.xlen(store.keys.job_events(job.id)) == 0
    assert [e.job_id for e in store.events(after=None, limit=10)] == [other.id]


def test_job_hash_and_rate_counter_carry_ttls(
    store: RedisStore, redis_client: redis.Redis, clock: Clock
) -> None:
    key = make_key(store, clock, rpm=5)
    job = make_job(key, clock, ttl_s=600)
    store.submit(job, rpm=5, now=clock.now)
    ttl_s = redis_client.pttl(store.keys.job(job.id)) / 1000
    assert 600 + store.expiry_grace_s - 5 < ttl_s <= 600 + store.expiry_grace_s
    rate_keys = list(redis_client.scan_iter(f"{store.keys.prefix}rate:*"))
    assert len(rate_keys) == 1 and 0 < redis_client.ttl(rate_keys[0]) <= 120


def test_job_vanished_from_redis_is_skipped_and_its_entry_dropped(
    store: RedisStore, redis_client: redis.Redis, clock: Clock
) -> None:
    """A job hash Redis expired by itself (no purge ran for the grace) does not jam the queue."""
    key = make_key(store, clock)
    gone, kept = make_job(key, clock), make_job(key, clock)
    store.submit(gone, rpm=0, now=clock.now)
    store.submit(kept, rpm=0, now=clock.now)
    redis_client.delete(store.keys.job(gone.id))
    claimed = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=5)
    assert [j.id for j in claimed] == [kept.id]
    assert redis_client.xlen(store.keys.queue(kept.slug)) == 1  # only the claimed one is left


def test_purge_removes_queue_entries_and_refunds(
    store: RedisStore, redis_client: redis.Redis, clock: Clock
) -> None:
    key = make_key(store, clock, balance_usd=1.0)
    job = make_job(key, clock, ttl_s=60, cost_usd=0.25)
    store.submit(job, rpm=0, now=clock.now)
    clock.advance(60)
    assert [j.id for j in store.purge_expired(now=clock.now)] == [job.id]
    assert redis_client.xlen(store.keys.queue(job.slug)) == 0
    assert not redis_client.exists(store.keys.job(job.id))
    assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now) == []
    assert store.stats(now=clock.now).queued_by_model == {}
    assert store.topup(key.id, 0.0) == pytest.approx(1.0)


def test_repeated_submit_of_one_job_is_charged_once(store: RedisStore, clock: Clock) -> None:
    """A submit retried after a lost reply (same job id) neither debits nor queues twice."""
    key = make_key(store, clock, balance_usd=1.0, rpm=5)
    job = make_job(key, clock, cost_usd=0.25)
    first = store.submit(job, rpm=5, now=clock.now)
    again = store.submit(job, rpm=5, now=clock.now)
    assert again == dataclasses.replace(first, event=None), "nothing appended again"
    assert store.topup(key.id, 0.0) == pytest.approx(0.75)
    assert store.stats(now=clock.now).queued_by_model == {"qwen-image": 1}


def test_revoked_or_unknown_key_cannot_submit(store: RedisStore, clock: Clock) -> None:
    key = make_key(store, clock, balance_usd=1.0)
    assert store.revoke_key(key.id)
    job = make_job(key, clock)
    with pytest.raises(Unauthenticated):
        store.submit(job, rpm=0, now=clock.now)
    assert store.get_job(job.id, now=clock.now) is None
    assert store.topup(key.id, 0.0) == pytest.approx(1.0)


def test_namespaces_do_not_see_each_other(redis_url: str, store: RedisStore, clock: Clock) -> None:
    other = RedisStore.from_url(redis_url, namespace=f"{store.keys.namespace}-other")
    try:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert other.list_keys() == []
        assert other.get_job(job.id, now=clock.now) is None
        assert other.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now) == []
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
    finally:
        other.close()


def test_invalid_namespace_is_refused() -> None:
    for bad in ("", "a:b", "{tag}", "x" * 65):
        with pytest.raises(ValueError):
            RedisKeys(bad)


# --- restarts and outages -----------------------------------------------------------------------
def test_state_survives_a_redis_restart_and_the_client_reconnects(
    tmp_path: pytest.TempPathFactory, clock: Clock
) -> None:
    with RedisServer(appendonly=True, dir=tmp_path / "aof") as server:  # type: ignore[operator]
        store = RedisStore.from_url(server.url)
        try:
            key = make_key(store, clock, balance_usd=1.0)
            running, waiting = make_job(key, clock, cost_usd=0.25), make_job(key, clock)
            store.submit(running, rpm=0, now=clock.now)
            store.submit(waiting, rpm=0, now=clock.now)
            assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
            server.restart()
            # The same store object: its pooled connections died with the server.
            assert store.complete(running.id, "w1", make_result(), now=clock.now)
            claimed = store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
            assert [j.id for j in claimed] == [waiting.id]
            assert store.topup(key.id, 0.0) == pytest.approx(0.65)
            server.kill()
            server.start()  # the append-only file is replayed after a SIGKILL too
            done = store.get_job(running.id, now=clock.now)
            assert done is not None and done.status is JobStatus.COMPLETED
            assert [e.type for e in store.job_events(running.id)][-1] is JobEventType.COMPLETED
            assert len(store.events(after=None, limit=100)) == 5
        finally:
            store.close()


def test_unreachable_redis_is_service_unavailable(clock: Clock) -> None:
    server = RedisServer().start()
    url = server.url
    server.stop()
    store = RedisStore.from_url(url)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as caught:
            store.get_job("anything", now=clock.now)
        assert caught.value.field == "store"
        assert time.monotonic() - started < 15
    finally:
        store.close()


# --- worker registry ----------------------------------------------------------------------------
def _info(worker_id: str, last_seen: float, current_job: str | None = None) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        host="host-a",
        slugs=("qwen-image",),
        resident=("Qwen/Qwen-Image",),
        current_job=current_job,
        started_at=last_seen - 5,
        last_seen=last_seen,
    )


def test_worker_registry_announce_lapse_remove(
    redis_url: str, redis_client: redis.Redis, namespace: str, clock: Clock
) -> None:
    registry = RedisWorkerRegistry.from_url(redis_url, namespace=namespace)
    try:
        registry.announce(_info("w2", clock.now, current_job="job-1"), ttl_s=10)
        registry.announce(_info("w1", clock.now), ttl_s=10)
        assert [w.worker_id for w in registry.alive(now=clock.now)] == ["w1", "w2"]
        assert registry.alive(now=clock.now)[1] == _info("w2", clock.now, current_job="job-1")
        clock.advance(5)
        registry.announce(_info("w1", clock.now), ttl_s=10)  # w2 fell silent (killed)
        clock.advance(6)
        assert [w.worker_id for w in registry.alive(now=clock.now)] == ["w1"]
        registry.announce(_info("w1", clock.now), ttl_s=10)
        assert redis_client.hkeys(RedisKeys(namespace).workers()) == ["w1"]  # w2 forgotten
        registry.remove("w1")
        assert registry.alive(now=clock.now) == []
    finally:
        registry.close()


# --- media --------------------------------------------------------------------------------------
NOW = 1_700_000_000.0


@pytest.fixture
def media(redis_url: str, redis_client: redis.Redis, namespace: str) -> Iterator[RedisMediaStore]:
    opened = RedisMediaStore.from_url(redis_url, namespace=namespace, max_bytes=1024)
    yield opened
    opened.close()


def test_media_round_trip_shared_between_nodes(
    media: RedisMediaStore, redis_url: str, namespace: str
) -> None:
    media_id = new_media_id()
    media.put(media_id, b"\x89PNG\x00\xff", "image/png", expires_at=NOW + 60)
    other_node = RedisMediaStore.from_url(redis_url, namespace=namespace)
    try:
        assert other_node.get(media_id, now=NOW) == (b"\x89PNG\x00\xff", "image/png")
    finally:
        other_node.close()
    assert media.get(new_media_id(), now=NOW) is None


def test_media_expiry_hides_then_purge_deletes(
    media: RedisMediaStore, redis_client: redis.Redis
) -> None:
    old, fresh = new_media_id(), new_media_id()
    media.put(old, b"old", "image/jpeg", expires_at=NOW + 10)
    media.put(fresh, b"fresh", "image/png", expires_at=NOW + 100)
    assert media.get(old, now=NOW + 9.9) is not None
    assert media.get(old, now=NOW + 10) is None
    assert media.purge_expired(now=NOW + 10) == 1
    assert media.purge_expired(now=NOW + 10) == 0
    assert not redis_client.exists(media.keys.media(old))
    assert media.get(old, now=NOW) is None  # gone, not just hidden
    assert media.get(fresh, now=NOW) == (b"fresh", "image/png")
    # a Redis TTL backs purge up, in case no API node runs it
    assert 0 < redis_client.pttl(media.keys.media(fresh)) <= media.expiry_grace_s * 1000


def test_media_size_bound_and_ids(media: RedisMediaStore, redis_client: redis.Redis) -> None:
    media.put(new_media_id(), b"x" * 1024, "image/png", expires_at=NOW + 60)
    too_big = new_media_id()
    with pytest.raises(ValueError, match="max_bytes"):
        media.put(too_big, b"x" * 1025, "image/png", expires_at=NOW + 60)
    assert media.get(too_big, now=NOW) is None
    with pytest.raises(ValueError, match="invalid media id"):
        media.put("../escape", b"x", "image/png", expires_at=NOW + 60)
    assert media.get("../escape", now=NOW) is None


def test_media_delete(media: RedisMediaStore, redis_client: redis.Redis) -> None:
    media_id = new_media_id()
    media.put(media_id, b"x", "image/webp", expires_at=NOW + 60)
    media.delete(media_id)
    media.delete(media_id)  # unknown: a no-op
    assert media.get(media_id, now=NOW) is None
    assert redis_client.zcard(media.keys.media_expiry()) == 0


def test_large_balances_round_trip_exactly(redis_url: str) -> None:
    """Balances past 1e14 micro-USD used to come back from Lua in exponent notation."""
    from qwenserve.store.redis import RedisStore
    from tests.store.contract import Clock, make_job, make_key

    store = RedisStore.from_url(redis_url, namespace=f"big{time.time_ns()}")
    clock = Clock()
    key = make_key(store, clock, balance_usd=1e9)
    outcome = store.submit(make_job(key, clock, cost_usd=0.02), rpm=0, now=clock.now)
    assert outcome.remaining_usd == pytest.approx(1e9 - 0.02)
    store.close()


def test_history_keeps_prompts_when_asked(redis_url: str, namespace: str, clock: Clock) -> None:
    kept = RedisStore.from_url(
        redis_url, namespace=namespace, history_policy=HistoryPolicy(keep_prompts=True)
    )
    try:
        key = make_key(kept, clock)
        job = make_job(key, clock)
        kept.submit(job, rpm=0, now=clock.now)
        [record] = kept.history(key.id, limit=5).records
        assert record.prompt == job.request.prompt
    finally:
        kept.close()


def test_jobs_queued_before_fair_queuing_are_still_claimed_in_order(
    store: RedisStore, redis_client: redis.Redis, clock: Clock
) -> None:
    """An upgrade: jobs a qwenserve from before weighted fair queuing left QUEUED (in the stream
    only, entries not handed out) join the fair sets before the first claim, in stream order."""
    key = make_key(store, clock)
    jobs = [make_job(key, clock) for _ in range(3)]
    for job in jobs:
        store.submit(job, rpm=0, now=clock.now)
    keys, slug = store.keys, jobs[0].slug
    # What an older qwenserve left: no fair sets, no fifo, entries not handed out.
    redis_client.delete(
        keys.waiting(slug),
        f"{keys.prefix}fairq:{slug}:{key.id}",
        f"{keys.prefix}fairkeys:{slug}",
        f"{keys.prefix}entries:{slug}",
        keys.fair_ready(),
    )
    for job in jobs:
        redis_client.hdel(keys.job(job.id), "fifo")
    redis_client.xgroup_setid(keys.queue(slug), CONSUMER_GROUP, "0")
    claimed = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=5)
    assert [j.id for j in claimed] == [j.id for j in jobs]
    assert redis_client.xpending(keys.queue(slug), CONSUMER_GROUP)["consumers"] == [
        {"name": "w1", "pending": 3}
    ]


def test_a_job_stored_before_sizes_were_fixed_still_loads_and_runs(
    store: RedisStore, redis_client: redis.Redis, clock: Clock
) -> None:
    """A job hash written by an older release (``params`` without ``size``) loads typed, its
    size fixed from its fields as the runtime planned it then; new ones keep theirs."""
    key = make_key(store, clock)
    job = make_job(key, clock)
    store.submit(job, rpm=0, now=clock.now)
    assert '"size":' in str(redis_client.hget(store.keys.job(job.id), "params"))
    redis_client.hset(
        store.keys.job(job.id), "params", json.dumps(v1_params("qwen-image", "old", 3))
    )
    old = store.get_job(job.id, now=clock.now)
    assert old is not None and (old.request.prompt, old.request.seed) == ("old", 3)
    assert old.size == OutputSize(SizeKind.RATIO, 1104 * 1472, 1104, 1472)
    [claimed] = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
    assert claimed.id == job.id and claimed.size == old.size
