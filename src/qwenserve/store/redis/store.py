"""The scale-out Store: N API nodes and M workers sharing one Redis server.

Every state change is one Lua script (``lua/``, assembled by ``scripts.py``), so it is atomic on
the server: two API nodes, or a worker and an API node, never interleave half-done changes. Key
names come from ``redis_keys``.

Queue. Each slug has a stream (``queue:<slug>``) with one consumer group, ``workers``; submit
XADDs the job id. A job's hash (``job:<id>``) is the source of truth for its state and the stream
is the queue order and ownership index:

* Submit hands each new entry at once to the group's placeholder consumer ``waiting``, and lists
  the job in ``waiting:<slug>`` (submit order) and its key's FIFO ``fairq:<slug>:<key>``; the
  claim picks by weighted fair queuing (below) and XCLAIMs the picked entry to its worker.
* The lease is ``lease_until`` in the job hash, set from the caller's ``now``, and mirrored in a
  per-slug sorted set (``leases:<slug>``, scored by lease_until). An expired lease is found with
  ZRANGEBYSCORE up to ``now`` and checked against the hash inside the claim script. Redis's own
  idle time (XAUTOCLAIM's min-idle-time) is not used to decide: it runs on the server's clock,
  and the Store protocol lets callers inject theirs. The pending entry is moved to the new worker
  with XCLAIM (and a heartbeat XCLAIMs it to itself, resetting its idle time), so XPENDING still
  shows who holds what.
* release() keeps the entry pending, marks the job QUEUED and lists it again in the waiting
  and fair sets at its submit's ``fifo`` score, its key's FIFO head; the claim it gives back is
  undone in its key's service (``fair_unclaim``: charged once, when it runs).
* complete/fail/cancel/purge XACK + XDEL the entry, so a stream only holds unfinished jobs: its
  length minus the leases is the queued count.

Control. A worker's heartbeat is one script for all its jobs: renew each lease it still holds,
record progress in the job hash, and answer owned / cancel-requested / lost. ``cancel`` ends a
QUEUED job in its script (refund, entry deleted) or sets ``cancel_requested_at`` on a running one.

Event log. Every script that changes a job's status appends its event in the same script
(``events.py`` reads the log). Each transition script also returns the events it appended
(``announced`` in helpers.lua, parsed by ``scripts.announced``), so every transition hands its
caller its events (``store/base.py``).

Wake-up. The submit and release scripts (and expire_leases) PUBLISH the job's slug on the
``wake`` channel in the same script, so no extra round trip: idle workers subscribed to it
(``redis_wakeup.RedisWakeup``) claim at once instead of at their next poll. Pub/sub is
fire-and-forget (a worker that is reconnecting misses messages), so workers still poll, slowly.
Likewise every script that ends a job PUBLISHes the job id on the ``done`` channel: API nodes
subscribed to it wake the POST /v1 handler waiting for that job (``notify.CompletionHub``),
which otherwise only re-reads the store now and then.

A claim first takes jobs whose lease ran out (oldest first; after ``max_attempts``, or on a job
whose owner asked to cancel it, the job ends with a refund instead), then by weighted fair
queuing (``store.fair``): ``fairkeys:<slug>`` holds the keys waiting for a model scored by
their tag, so the next key is a sorted-set head per model asked for (O(log K), lazily raised
when stale), and its job the head of its FIFO. Keys at their ``max_running`` (``running:<key>``
set) are passed over. Entries whose job hash is gone (expired by Redis) are acknowledged and
deleted. Queue positions: each QUEUED job is in ``fairorder:<slug>``, scored by its projected
start in that order (stamped when it starts waiting, ``store/sqlite/fair_order.py`` says how),
so a status poll's position is one ZRANK.

Money is integer micro-USD (HINCRBY). Rate limits are a fixed window per key and wall-clock
minute: ``rate:<key_id>:<floor(now / 60)>`` counts admitted submits (INCR, EXPIRE 120 s), read,
checked and raised in the submit script together with the debit, the job insert and the XADD, so
a refused submit changes nothing. A burst straddling a minute boundary can admit up to 2 x rpm
within 60 s; the next window starts at the following minute.

Backpressure. Every QUEUED job's id is in the ``queued`` set and its key's ``keyqueued:<key>``
set (added by submit and release, removed by whatever takes it out of the queue), so the submit
script checks the cluster's and the key's queue limits with two SCARDs before it charges. A job
with a start deadline is in the ``startby`` zset while it waits; the claim script (and
purge_expired's sweep) first ends those past it, refunded. Jobs queued before this existed are
not counted until they leave the queue.

Expiry. A job hash gets a Redis TTL of ``expires_at - now + expiry_grace_s``; reads hide it
from ``expires_at`` on, and the sweep (``expiry.py``) refunds, announces and returns it.

The scripts derive per-slug and per-job key names from the prefix, so this needs one Redis
server (with replicas and Sentinel for failover: ``client.RedisConnector``), not a Redis Cluster.
With ``min_replicas`` a submit is answered only once that many replicas hold it
(``replication.py``: WAIT in the submit's pipeline; unconfirmed, it is withdrawn and refunded).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar, cast

import redis
from redis.commands.core import Script

from qwenserve.errors import QwenServeError
from qwenserve.jobs import Job, JobEvent, JobResult, JobStatus, Progress
from qwenserve.store import fair, rules
from qwenserve.store.base import (
    Cancelled,
    Claimed,
    Heartbeat,
    Idempotency,
    QueueStats,
    Store,
    SubmitOutcome,
)
from qwenserve.store.history import HistoryPolicy
from qwenserve.store.records import job_from_record, request_text
from qwenserve.store.redis.client import (
    RedisConnector,
    float_text,
    pairs,
    unavailable_as_503,
)
from qwenserve.store.redis.events import RedisEventLog
from qwenserve.store.redis.expiry import RedisExpiry
from qwenserve.store.redis.history import RedisHistory, refusal_fields
from qwenserve.store.redis.keys import RedisApiKeys
from qwenserve.store.redis.replication import DEFAULT_REPLICA_WAIT_S, ReplicaWait
from qwenserve.store.redis.scripts import JobScripts, announced, last_announced
from qwenserve.store.redis.webhooks import RedisWebhooks
from qwenserve.store.redis_keys import DEFAULT_NAMESPACE, RedisKeys

RATE_KEY_TTL_S = 2 * rules.RATE_WINDOW_S
DEFAULT_EXPIRY_GRACE_S = 24 * 3600.0

_T = TypeVar("_T")


class RedisStore(RedisApiKeys, RedisEventLog, RedisExpiry, RedisHistory, RedisWebhooks, Store):
    """A Store in Redis, shared by every API node and worker (see the module docstring).

    Args:
        client: a redis-py client with ``decode_responses=True`` (``from_url`` makes one that
            reconnects with backoff).
        namespace: key prefix, so several deployments or tests can share one server.
        expiry_grace_s: how long past ``expires_at`` Redis keeps a job for purge_expired.
        history_policy: how long request history is kept, and whether with prompts.
        min_replicas: replicas that must confirm a submit before it is answered (0: none; see
            ``replication.py``); ``replica_wait_s`` how long to wait for them.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        expiry_grace_s: float = DEFAULT_EXPIRY_GRACE_S,
        history_policy: HistoryPolicy = HistoryPolicy(),  # noqa: B008 - frozen
        min_replicas: int = 0,
        replica_wait_s: float = DEFAULT_REPLICA_WAIT_S,
    ) -> None:
        self._redis = client
        self.history_policy = history_policy
        self.keys = RedisKeys(namespace)
        self.expiry_grace_s = expiry_grace_s
        self._scripts = JobScripts(client)
        self._replicas = ReplicaWait(client, min_replicas=min_replicas, wait_s=replica_wait_s)
        self._fair_ready = False
        self._webhook_scripts = self.webhook_scripts(client)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        expiry_grace_s: float = DEFAULT_EXPIRY_GRACE_S,
        history_policy: HistoryPolicy = HistoryPolicy(),  # noqa: B008 - frozen
        min_replicas: int = 0,
    ) -> RedisStore:
        """A store on a Redis store URL (``redis://``, ``rediss://``, ``redis+sentinel://``;
        tests and tools: servers use ``open_backend``); nothing is sent until used."""
        return cls(
            RedisConnector.from_url(url).client(),
            namespace=namespace,
            expiry_grace_s=expiry_grace_s,
            history_policy=history_policy,
            min_replicas=min_replicas,
        )

    def close(self) -> None:
        self._redis.close()

    def _run(self, call: Callable[[], _T]) -> _T:
        with unavailable_as_503("the job store"):
            return call()

    def _hash(self, key: str) -> dict[str, str]:
        return cast(dict[str, str], self._run(lambda: self._redis.hgetall(key)))

    def _members(self, key: str) -> list[str]:
        return sorted(cast(set[str], self._run(lambda: self._redis.smembers(key))))

    def _eval(self, script: Script, keys: Sequence[str], *args: str | int | float) -> Any:
        """Run ``script`` with the key prefix as ARGV[1]."""
        with unavailable_as_503("the job store"):
            return script(keys=list(keys), args=[self.keys.prefix, *args])

    # --- jobs -------------------------------------------------------------------------------
    def submit(
        self,
        job: Job,
        *,
        rpm: int,
        now: float,
        idempotency: Idempotency | None = None,
        max_queued: int = 0,
    ) -> SubmitOutcome:
        refused = job.status is JobStatus.FAILED  # refused by the API (content policy)
        cost_micro = 0 if refused else rules.to_micro(job.cost_usd)
        window = math.floor(now / rules.RATE_WINDOW_S)
        ttl_ms = max(1, math.ceil((job.expires_at - now + self.expiry_grace_s) * 1000))
        fields = {
            "id": job.id,
            "slug": job.slug,
            "key_id": job.key_id,
            "params": request_text(job.request),
            "status": job.status.value if refused else JobStatus.QUEUED.value,
            "created_at": float_text(job.created_at),
            "expires_at": float_text(job.expires_at),
            "cost_micro": str(cost_micro),
            "attempts": "0",
            "service": float_text(fair.service_units(job.request)),
            **({"webhook_url": job.webhook_url} if job.webhook_url else {}),
            **({"start_by": float_text(job.start_by)} if job.start_by is not None else {}),
            **(refusal_fields(job, now) if refused else {}),
        }
        reply, replicated = self._replicas.run(
            self._scripts.submit,
            [
                self.keys.api_key(job.key_id),
                self.keys.rate(job.key_id, window),
                self.keys.job(job.id),
                self.keys.slugs(),
                self.keys.expiry(),
                self.keys.idempotency(job.key_id, idempotency.key if idempotency else ""),
                self.keys.queued(),
                self.keys.key_queued(job.key_id),
            ],
            [
                self.keys.prefix,
                job.id,
                job.slug,
                cost_micro,
                rpm,
                RATE_KEY_TTL_S,
                ttl_ms,
                float_text(job.expires_at),
                float_text(job.created_at),
                float_text(now),
                idempotency.body_hash if idempotency else "",
                float_text(now + rules.IDEMPOTENCY_TTL_S),
                math.ceil((rules.IDEMPOTENCY_TTL_S + self.expiry_grace_s) * 1000),
                *self._history_args(job, now),
                max_queued,
                "0" if refused else "1",
                *[part for pair in fields.items() for part in pair],
            ],
        )
        outcome = str(reply[0])
        if outcome == "idempotency_conflict":
            raise rules.idempotency_mismatch(str(reply[1]), str(reply[2]))
        if outcome == "unauthenticated":
            raise rules.invalid_key()
        if outcome == "queue_full":
            raise rules.queue_full(max_queued)
        if outcome == "key_queue_full":
            raise rules.key_queue_full(int(reply[1]))
        if outcome == "rate_limited":
            raise rules.rate_limited(
                rpm, reset_at=float((window + 1) * rules.RATE_WINDOW_S), now=now
            )
        if outcome == "insufficient":
            raise rules.insufficient_credits(cost_micro, int(reply[1]))
        if outcome not in ("ok", "replay"):  # pragma: no cover - the script has no other answer
            raise QwenServeError(f"unexpected reply from the submit script: {reply!r}")
        if not replicated:
            record = self.keys.idempotency(job.key_id, idempotency.key) if idempotency else None
            self._replicas.withdraw(
                self._scripts.withdraw,
                prefix=self.keys.prefix,
                job_key=self.keys.job(job.id),
                job_id=job.id,
                idempotency_record=record,
                now_text=float_text(now),
            )
        remaining = int(reply[2])
        appended = announced(reply[3]) if outcome == "ok" and len(reply) > 3 else ()
        return SubmitOutcome(
            remaining_usd=rules.to_usd(int(reply[1])),
            rate_limit_remaining=remaining if remaining >= 0 else None,
            replay_of=str(reply[3]) if outcome == "replay" else None,
            event=appended[0] if appended else None,
        )

    def get_job(self, job_id: str, *, now: float) -> Job | None:
        data = self._hash(self.keys.job(job_id))
        if not data or float(data["expires_at"]) <= now:
            return None
        return job_from_record(data)

    def _slugs(self, slugs: Collection[str] | None) -> list[str]:
        if slugs is not None:
            return sorted(set(slugs))
        return self._members(self.keys.slugs())

    def claim(
        self,
        worker_id: str,
        *,
        slugs: Collection[str] | None,
        lease_s: float,
        max_attempts: int,
        now: float,
        limit: int = 1,
    ) -> Claimed:
        if limit <= 0:
            return Claimed()
        if not self._fair_ready:  # once per process: a queue from an older qwenserve joins
            self._eval(self._scripts.migrate_fair, [self.keys.slugs(), self.keys.fair_ready()])
            self._fair_ready = True
        chosen = self._slugs(slugs)
        if not chosen:
            return Claimed()
        keys = [key for slug in chosen for key in (self.keys.queue(slug), self.keys.leases(slug))]
        reply = self._eval(
            self._scripts.claim,
            keys,
            worker_id,
            float_text(now),
            float_text(now + lease_s),
            max_attempts,
            limit,
            rules.gave_up_template(max_attempts),
            *chosen,
        )
        jobs, appended = reply
        return Claimed((job_from_record(pairs(flat)) for flat in jobs), announced(appended))

    def heartbeat(
        self, worker_id: str, progress: Mapping[str, Progress | None], *, lease_s: float, now: float
    ) -> Heartbeat:
        job_ids = list(progress)
        if not job_ids:
            return Heartbeat(owned=frozenset(), cancelled=frozenset(), lost=frozenset())
        args: list[str | int] = []
        for job_id in job_ids:
            report = progress[job_id]
            args += [job_id, *((report.step, report.total_steps) if report else ("", ""))]
        flags = self._eval(
            self._scripts.heartbeat,
            [],
            worker_id,
            float_text(now + lease_s),
            float_text(now),
            *args,
        )
        by_flag: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
        for job_id, flag in zip(job_ids, flags, strict=True):
            by_flag[int(flag)].add(job_id)
        return Heartbeat(
            owned=frozenset(by_flag[1] | by_flag[2]),
            cancelled=frozenset(by_flag[2]),
            lost=frozenset(by_flag[0]),
        )

    def complete(
        self, job_id: str, worker_id: str, result: JobResult, *, now: float
    ) -> JobEvent | None:
        return last_announced(
            self._eval(
                self._scripts.complete,
                [self.keys.job(job_id)],
                job_id,
                worker_id,
                json.dumps(result.to_dict()),
                float_text(now),
            )
        )

    def fail(
        self,
        job_id: str,
        worker_id: str | None,
        *,
        kind: str,
        message: str,
        now: float,
        refund: bool = True,
    ) -> JobEvent | None:
        return last_announced(
            self._eval(
                self._scripts.fail,
                [self.keys.job(job_id)],
                job_id,
                worker_id or "",
                kind,
                message,
                float_text(now),
                "1" if refund else "0",
            )
        )

    def release(self, job_id: str, worker_id: str, *, now: float) -> JobEvent | None:
        return last_announced(
            self._eval(
                self._scripts.release, [self.keys.job(job_id)], job_id, worker_id, float_text(now)
            )
        )

    def cancel(self, job_id: str, key_id: str, *, now: float) -> Cancelled:
        reply = self._eval(
            self._scripts.cancel, [self.keys.job(job_id)], job_id, key_id, float_text(now)
        )
        outcome = str(reply[0])
        if outcome == "unknown":
            raise rules.unknown_request(job_id)
        if outcome == "ended":
            raise rules.already_ended(job_id, str(reply[1]))
        return Cancelled(job_from_record(pairs(reply[1])), announced(reply[2]))

    def expire_leases(self, *, now: float) -> int:
        leases = [self.keys.leases(slug) for slug in self._slugs(None)]
        if not leases:
            return 0
        return int(self._eval(self._scripts.expire_leases, leases, float_text(now)))

    def stats(self, *, now: float) -> QueueStats:
        rows = self._eval(self._scripts.stats, [self.keys.slugs()])
        queued: dict[str, int] = {}
        processing: dict[str, int] = {}
        waiting: dict[str, int] = {}
        oldest: float | None = None
        for slug, queued_count, processing_count, oldest_text, waiting_count in rows:
            if int(queued_count):
                queued[str(slug)] = int(queued_count)
            if int(processing_count):
                processing[str(slug)] = int(processing_count)
            if int(waiting_count):
                waiting[str(slug)] = int(waiting_count)
            if oldest_text:
                created_at = float(oldest_text)
                oldest = created_at if oldest is None else min(oldest, created_at)
        return QueueStats(
            queued_by_model=queued,
            processing_by_model=processing,
            waiting_by_model=waiting,
            oldest_queued_age_s=max(0.0, now - oldest) if oldest is not None else None,
        )

    def queue_position(self, job_id: str, *, now: float) -> int | None:
        ahead = int(
            self._eval(
                self._scripts.queue_position, [self.keys.job(job_id)], float_text(now), job_id
            )
        )
        return ahead if ahead >= 0 else None
