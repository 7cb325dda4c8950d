"""The scale-out Store: N API nodes and M workers sharing one Redis server.

Every state change is one Lua script, so it is atomic on the server: two API nodes, or a worker
and an API node, never interleave half-done changes. Key names come from ``redis_keys``.

Queue. Each slug has a stream (``queue:<slug>``) with one consumer group, ``workers``; submit
XADDs the job id. A job's hash (``job:<id>``) is the source of truth for its state and the stream
is the queue order and ownership index:

* New jobs are delivered with XREADGROUP, so each stream entry goes to exactly one worker.
* The lease is ``lease_until`` in the job hash, set from the caller's ``now``, and mirrored in a
  per-slug sorted set (``leases:<slug>``, scored by lease_until). An expired lease is found with
  ZRANGEBYSCORE up to ``now`` and checked against the hash inside the claim script. Redis's own
  idle time (XAUTOCLAIM's min-idle-time) is not used to decide: it runs on the server's clock,
  and the Store protocol lets callers inject theirs. The pending entry is moved to the new worker
  with XCLAIM (and renew_lease XCLAIMs it to itself, resetting its idle time), so XPENDING still
  shows who holds what.
* release() keeps the entry pending, marks the job QUEUED and lists it in ``requeued:<slug>``;
  the next claim takes it back with XCLAIM, in its original queue position.
* complete/fail/purge XACK + XDEL the entry, so a stream only holds unfinished jobs: its length
  minus the leases is the queued count.

Wake-up. The submit and release scripts (and expire_leases) PUBLISH the job's slug on the
``wake`` channel in the same script, so no extra round trip: idle workers subscribed to it
(``redis_wakeup.RedisWakeup``) claim at once instead of at their next poll. Pub/sub is
fire-and-forget (a worker that is reconnecting misses messages), so workers still poll, slowly.
Likewise every script that ends a job (complete, fail, a claim that fails a job after
``max_attempts`` lost leases, a purge that refunds an unfinished job) PUBLISHes the job id on the
``done`` channel: API nodes subscribed to it wake the POST /v1 handler waiting for that job
(``api.waiting.CompletionHub``), which otherwise only re-reads the store now and then.

A claim looks at up to ``limit`` new entries (XRANGE after the group's last-delivered id), expired
leases and released jobs of every slug asked for, sorts them by stream entry id (the submit order)
and takes the oldest; a lease that ran out after ``max_attempts`` fails the job with a refund on
the way. Entries whose job hash is gone (expired by Redis) are acknowledged and deleted.

Money is integer micro-USD (HINCRBY). Rate limits are a fixed window per key and wall-clock
minute: ``rate:<key_id>:<floor(now / 60)>`` counts admitted submits (INCR, EXPIRE 120 s), read,
checked and raised in the submit script together with the debit, the job insert and the XADD, so
a refused submit changes nothing. A burst straddling a minute boundary can admit up to 2 x rpm
within 60 s; the next window starts at the following minute.

Expiry. A job hash gets a Redis TTL of ``expires_at - now + expiry_grace_s``. Reads hide a job
from ``expires_at`` on; the grace keeps it long enough for purge_expired (run by every API node)
to find it through the ``expiry`` zset, refund it if it never finished, remove its stream entry
and return it so its media can go. The TTL is relative to the caller's ``now`` rather than an
EXPIREAT, so an injected test clock does not make Redis delete fresh jobs. If no purge runs for
the whole grace, Redis drops the job itself (its refund is then lost).

Connections retry with exponential backoff on connection errors (a Redis restart); a Redis that
stays unreachable surfaces as ServiceUnavailable. The scripts derive per-slug and per-job key
names from the prefix, so this needs one Redis server, not a Redis Cluster.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from qwenserve.errors import (
    InsufficientCredits,
    InvalidRequest,
    QwenServeError,
    RateLimited,
    ServiceUnavailable,
    Unauthenticated,
)
from qwenserve.jobs import Job, JobResult, JobStatus
from qwenserve.store.base import ApiKey, QueueStats, Store, SubmitOutcome
from qwenserve.store.redis_keys import DEFAULT_NAMESPACE, LUA_KEY_FUNCTIONS, RedisKeys
from qwenserve.store.workers import WorkerInfo

MICRO_PER_USD = 1_000_000
RATE_WINDOW_S = 60
RATE_KEY_TTL_S = 2 * RATE_WINDOW_S
DEFAULT_EXPIRY_GRACE_S = 24 * 3600.0
PURGE_BATCH = 500

RECONNECT_RETRIES = 6
RECONNECT_BACKOFF_BASE_S = 0.05
RECONNECT_BACKOFF_CAP_S = 1.0
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

_T = TypeVar("_T")


def connect(url: str, *, decode_responses: bool = True) -> redis.Redis:
    """A client for ``url`` that reconnects (with backoff) when Redis restarts or the link drops.

    Raises:
        ValueError: the URL is not a redis:// or rediss:// URL.
    """
    retry = Retry(
        ExponentialBackoff(cap=RECONNECT_BACKOFF_CAP_S, base=RECONNECT_BACKOFF_BASE_S),
        RECONNECT_RETRIES,
        supported_errors=(redis.ConnectionError, redis.TimeoutError, TimeoutError),
    )
    client: redis.Redis = redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        retry=retry,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    return client


@contextmanager
def unavailable_as_503(what: str) -> Iterator[None]:
    """Turn a Redis that stays unreachable after the retries into ServiceUnavailable."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise ServiceUnavailable(f"{what} (Redis) is unreachable: {error}", field="store") from None


def _to_micro(amount_usd: float) -> int:
    return round(amount_usd * MICRO_PER_USD)


def _to_usd(amount_micro: int) -> float:
    return amount_micro / MICRO_PER_USD


def _float_text(value: float) -> str:
    """Times are stored as Python's shortest exact repr, so they round-trip bit for bit."""
    return repr(float(value))


def _optional_float(value: str | None) -> float | None:
    return float(value) if value is not None else None


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A Lua HGETALL reply (k1, v1, k2, v2, …) as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def _job_from_hash(data: Mapping[str, str]) -> Job:
    result = data.get("result")
    return Job(
        id=data["id"],
        slug=data["slug"],
        key_id=data["key_id"],
        params=json.loads(data["params"]),
        status=JobStatus(data["status"]),
        created_at=float(data["created_at"]),
        expires_at=float(data["expires_at"]),
        cost_usd=_to_usd(int(data["cost_micro"])),
        attempts=int(data.get("attempts", "0")),
        started_at=_optional_float(data.get("started_at")),
        finished_at=_optional_float(data.get("finished_at")),
        result=JobResult.from_dict(json.loads(result)) if result is not None else None,
        error=data.get("error"),
        error_kind=data.get("error_kind"),
        worker_id=data.get("worker_id"),
        lease_until=_optional_float(data.get("lease_until")),
        extra=json.loads(data.get("extra", "{}")),
    )


def _key_from_hash(data: Mapping[str, str]) -> ApiKey:
    return ApiKey(
        id=data["id"],
        key_hash=data["key_hash"],
        name=data["name"],
        balance_usd=_to_usd(int(data["balance_micro"])),
        rpm=int(data["rpm"]),
        models=tuple(json.loads(data["models"])),
        created_at=float(data["created_at"]),
        revoked=data.get("revoked") == "1",
    )


# --- Lua ------------------------------------------------------------------------------------
# Every script starts with LUA_KEY_FUNCTIONS (ARGV[1] is the key prefix) and these helpers.
# Numbers that are stored (times, leases) are passed in as text from Python and stored as is:
# Lua would print a double with 14 digits only.
_LUA_HELPERS = """
local function entry_before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq = tonumber(ams) or 0, tonumber(aseq) or 0
  bms, bseq = tonumber(bms) or 0, tonumber(bseq) or 0
  if ams ~= bms then return ams < bms end
  return aseq < bseq
end

-- The id of the last entry the group handed out, or nil when the stream or group is missing.
local function last_delivered(stream)
  if redis.call('EXISTS', stream) == 0 then return nil end
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for i = 1, #group, 2 do
      if group[i] == 'name' then name = group[i + 1] end
      if group[i] == 'last-delivered-id' then last = group[i + 1] end
    end
    if name == GROUP then return last end
  end
  return nil
end

-- A job leaves the queue: its entry is acknowledged and deleted, its indexes forget it.
local function leave_queue(slug, job_id, entry)
  if not slug then return end
  if entry then
    redis.call('XACK', queue_key(slug), GROUP, entry)
    redis.call('XDEL', queue_key(slug), entry)
  end
  redis.call('ZREM', leases_key(slug), job_id)
  redis.call('ZREM', requeued_key(slug), job_id)
end

local function refund(job)
  local cost = tonumber(redis.call('HGET', job, 'cost_micro')) or 0
  local key = api_key_key(redis.call('HGET', job, 'key_id') or '')
  if cost > 0 and redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'balance_micro', cost)
  end
end

local function fail_and_refund(job_id, kind, message, now)
  local job = job_key(job_id)
  local slug, entry = unpack(redis.call('HMGET', job, 'slug', 'entry'))
  redis.call('HSET', job, 'status', 'FAILED', 'error', message, 'error_kind', kind,
             'finished_at', now)
  redis.call('HDEL', job, 'lease_until')
  leave_queue(slug, job_id, entry)
  refund(job)
  redis.call('PUBLISH', done_channel(), job_id)
end
"""

_CREATE_KEY = """
-- KEYS: key hash, hash lookup, key set; ARGV: prefix, key id, field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""

_REVOKE_KEY = """
-- KEYS: key hash
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'revoked', '1')
return 1
"""

_TOPUP = """
-- KEYS: key hash; ARGV: prefix, amount (micro-USD)
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBY', KEYS[1], 'balance_micro', ARGV[2])
"""

_SUBMIT = """
-- KEYS: key hash, rate counter, job hash, slug set, expiry zset
-- ARGV: prefix, job id, slug, cost, rpm, rate ttl s, job ttl ms, expires_at, created_at,
--       job field/value pairs
local job_id, slug = ARGV[2], ARGV[3]
local cost, rpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local key = redis.call('HMGET', KEYS[1], 'balance_micro', 'revoked')
if not key[1] or key[2] == '1' then return {'unauthenticated'} end
local balance = tonumber(key[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- The same submit again: a retry after a lost reply. It went through the first time.
  return {'ok', string.format('%.0f', balance), tostring(rpm > 0 and math.max(rpm - used, 0) or -1)}
end
if rpm > 0 and used >= rpm then return {'rate_limited'} end
if cost > balance then return {'insufficient', string.format('%.0f', balance)} end
if cost > 0 then balance = redis.call('HINCRBY', KEYS[1], 'balance_micro', -cost) end
if rpm > 0 then
  used = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call('HSET', KEYS[3], unpack(ARGV, 10))
local stream = queue_key(slug)
if redis.call('EXISTS', stream) == 0 then
  redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
end
local entry = redis.call('XADD', stream, '*', 'job', job_id, 'created_at', ARGV[9])
redis.call('HSET', KEYS[3], 'entry', entry)
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('SADD', KEYS[4], slug)
redis.call('ZADD', KEYS[5], ARGV[8], job_id)
redis.call('PUBLISH', wake_channel(), slug)
return {'ok', string.format('%.0f', balance), tostring(rpm > 0 and rpm - used or -1)}
"""

_CLAIM = """
-- KEYS: (stream, leases, requeued) per slug
-- ARGV: prefix, worker id, now, lease_until, max_attempts, limit
local worker, now_text, lease_until = ARGV[2], ARGV[3], ARGV[4]
local now, max_attempts, limit = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
local slugs = #KEYS / 3
local claimed, taken = {}, {}

local function entry_of(job_id)
  return redis.call('HGET', job_key(job_id), 'entry') or '0-0'
end

-- Up to `want` candidates of each kind per slug, oldest entry first.
local function candidates(want)
  local found = {}
  for s = 1, slugs do
    local stream, leases, requeued = KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s]
    local last = last_delivered(stream)
    if last then
      for _, e in ipairs(redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', want)) do
        found[#found + 1] = {kind = 'new', s = s, entry = e[1]}
      end
    end
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now_text, 'LIMIT', 0, want)) do
      if not taken[id] then
        found[#found + 1] = {kind = 'lease', s = s, id = id, entry = entry_of(id)}
      end
    end
    for _, id in ipairs(redis.call('ZRANGE', requeued, 0, want - 1)) do
      found[#found + 1] = {kind = 'requeued', s = s, id = id, entry = entry_of(id)}
    end
  end
  table.sort(found, function(a, b) return entry_before(a.entry, b.entry) end)
  return found
end

local function take(s, job_id)
  local job = job_key(job_id)
  redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('HSET', job, 'status', 'PROCESSING', 'worker_id', worker, 'lease_until', lease_until)
  redis.call('HSETNX', job, 'started_at', now_text)
  redis.call('ZADD', KEYS[3 * s - 1], lease_until, job_id)
  redis.call('ZREM', KEYS[3 * s], job_id)
  claimed[#claimed + 1] = job_id
  taken[job_id] = true
end

local function take_new(c)
  local stream = KEYS[3 * c.s - 2]
  -- The group hands out entries in order, so this is c.entry.
  local reply = redis.call('XREADGROUP', 'GROUP', GROUP, worker, 'COUNT', 1, 'STREAMS', stream, '>')
  if not reply or not reply[1] or not reply[1][2][1] then return end
  local entry, fields = reply[1][2][1][1], reply[1][2][1][2]
  local job_id
  for i = 1, #fields, 2 do
    if fields[i] == 'job' then job_id = fields[i + 1] end
  end
  if job_id and redis.call('HGET', job_key(job_id), 'status') == 'QUEUED' then
    take(c.s, job_id)
  else
    -- The job expired (or was failed) under Redis's feet: drop its entry.
    redis.call('XACK', stream, GROUP, entry)
    redis.call('XDEL', stream, entry)
  end
end

local function take_expired(c)
  local job = job_key(c.id)
  local status, until_text, attempts, slug, entry = unpack(redis.call('HMGET', job, 'status',
    'lease_until', 'attempts', 'slug', 'entry'))
  if status ~= 'PROCESSING' then
    redis.call('ZREM', KEYS[3 * c.s - 1], c.id)
    if not status then
      redis.call('XACK', KEYS[3 * c.s - 2], GROUP, c.entry)
      redis.call('XDEL', KEYS[3 * c.s - 2], c.entry)
    end
    return
  end
  if until_text and tonumber(until_text) > now then
    redis.call('ZADD', KEYS[3 * c.s - 1], until_text, c.id)  -- the index lagged the hash
    return
  end
  attempts = tonumber(attempts) or 0
  if attempts >= max_attempts then
    local message = 'the worker running this job was lost ' .. attempts .. ' times; gave up '
      .. 'after ' .. attempts .. ' attempts (max_attempts=' .. max_attempts .. ')'
    fail_and_refund(c.id, 'InferenceError', message, now_text)
    return
  end
  if entry then
    redis.call('XCLAIM', KEYS[3 * c.s - 2], GROUP, worker, 0, entry, 'JUSTID')
  end
  take(c.s, c.id)
end

local function take_requeued(c)
  redis.call('ZREM', KEYS[3 * c.s], c.id)
  local status, entry = unpack(redis.call('HMGET', job_key(c.id), 'status', 'entry'))
  if status ~= 'QUEUED' then return end
  if entry then
    redis.call('XCLAIM', KEYS[3 * c.s - 2], GROUP, worker, 0, entry, 'JUSTID')
  end
  take(c.s, c.id)
end

-- Each pass either claims or removes every candidate it handles, so the loop ends.
for _ = 1, 100 do
  if #claimed >= limit then break end
  local found = candidates(limit - #claimed)
  if #found == 0 then break end
  for _, c in ipairs(found) do
    if #claimed >= limit then break end
    if c.kind == 'new' then take_new(c)
    elseif c.kind == 'lease' then take_expired(c)
    else take_requeued(c) end
  end
end

local jobs = {}
for i, job_id in ipairs(claimed) do
  jobs[i] = redis.call('HGETALL', job_key(job_id))
end
return jobs
"""

_RENEW = """
-- KEYS: job hash; ARGV: prefix, job id, worker id, lease_until
local status, owner, slug, entry = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker_id',
  'slug', 'entry'))
if status ~= 'PROCESSING' or owner ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[4])
redis.call('ZADD', leases_key(slug), ARGV[4], ARGV[2])
if entry then
  -- Resets the pending entry's idle time, so XPENDING shows a live worker as such.
  redis.call('XCLAIM', queue_key(slug), GROUP, ARGV[3], 0, entry, 'JUSTID')
end
return 1
"""

_COMPLETE = """
-- KEYS: job hash; ARGV: prefix, job id, worker id, result JSON, now
local status, owner, slug, entry = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker_id',
  'slug', 'entry'))
if status ~= 'PROCESSING' or owner ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'COMPLETED', 'result', ARGV[4], 'finished_at', ARGV[5])
redis.call('HDEL', KEYS[1], 'lease_until')
leave_queue(slug, ARGV[2], entry)
redis.call('PUBLISH', done_channel(), ARGV[2])
return 1
"""

_FAIL = """
-- KEYS: job hash; ARGV: prefix, job id, worker id ('' for any), kind, message, now
local status, owner = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker_id'))
if status ~= 'QUEUED' and status ~= 'PROCESSING' then return 0 end
if ARGV[3] ~= '' and (status ~= 'PROCESSING' or owner ~= ARGV[3]) then return 0 end
fail_and_refund(ARGV[2], ARGV[4], ARGV[5], ARGV[6])
return 1
"""

_RELEASE = """
-- KEYS: job hash; ARGV: prefix, job id, worker id
local status, owner, attempts, slug, created_at = unpack(redis.call('HMGET', KEYS[1], 'status',
  'worker_id', 'attempts', 'slug', 'created_at'))
if status ~= 'PROCESSING' or owner ~= ARGV[3] then return 0 end
attempts = tonumber(attempts) or 0
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'attempts', math.max(attempts - 1, 0))
redis.call('HDEL', KEYS[1], 'worker_id', 'lease_until')
if attempts <= 1 then redis.call('HDEL', KEYS[1], 'started_at') end
redis.call('ZREM', leases_key(slug), ARGV[2])
redis.call('ZADD', requeued_key(slug), created_at, ARGV[2])
redis.call('PUBLISH', wake_channel(), slug)
return 1
"""

_EXPIRE_LEASES = """
-- KEYS: leases zsets; ARGV: prefix, now
local count = 0
for _, leases in ipairs(KEYS) do
  for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', leases, '(' .. ARGV[2], '+inf')) do
    local status, slug = unpack(redis.call('HMGET', job_key(job_id), 'status', 'slug'))
    if status == 'PROCESSING' then
      redis.call('HSET', job_key(job_id), 'lease_until', ARGV[2])
      redis.call('ZADD', leases, ARGV[2], job_id)
      redis.call('PUBLISH', wake_channel(), slug)
      count = count + 1
    else
      redis.call('ZREM', leases, job_id)
    end
  end
end
return count
"""

_PURGE = """
-- KEYS: expiry zset; ARGV: prefix, now, batch size
local purged = {}
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0,
                                   ARGV[3])) do
  local job = job_key(job_id)
  local data = redis.call('HGETALL', job)
  if #data > 0 then
    local status, slug, entry = unpack(redis.call('HMGET', job, 'status', 'slug', 'entry'))
    if status == 'QUEUED' or status == 'PROCESSING' then
      refund(job)
      -- It never finished and now never will: whoever waits for it stops waiting.
      redis.call('PUBLISH', done_channel(), job_id)
    end
    leave_queue(slug, job_id, entry)
    redis.call('DEL', job)
    purged[#purged + 1] = data
  end
  redis.call('ZREM', KEYS[1], job_id)
end
return purged
"""

_STATS = """
-- KEYS: slug set; ARGV: prefix
local rows = {}
for _, slug in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local stream = queue_key(slug)
  local processing = redis.call('ZCARD', leases_key(slug))
  local queued = redis.call('XLEN', stream) - processing
  local oldest = ''
  local last = last_delivered(stream)
  if last then
    local head = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
    if head[1] then
      for i = 1, #head[1][2], 2 do
        if head[1][2][i] == 'created_at' then oldest = head[1][2][i + 1] end
      end
    end
  end
  local back = redis.call('ZRANGE', requeued_key(slug), 0, 0, 'WITHSCORES')
  if back[2] and (oldest == '' or tonumber(back[2]) < tonumber(oldest)) then oldest = back[2] end
  rows[#rows + 1] = {slug, math.max(queued, 0), processing, oldest}
end
return rows
"""


class RedisStore(Store):
    """A Store in Redis, shared by every API node and worker (see the module docstring).

    Args:
        client: a redis-py client with ``decode_responses=True`` (``from_url`` makes one that
            reconnects with backoff).
        namespace: key prefix, so several deployments or tests can share one server.
        expiry_grace_s: how long past ``expires_at`` Redis keeps a job for purge_expired.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        expiry_grace_s: float = DEFAULT_EXPIRY_GRACE_S,
    ) -> None:
        self._redis = client
        self.keys = RedisKeys(namespace)
        self.expiry_grace_s = expiry_grace_s

        def script(body: str) -> Script:
            return client.register_script(LUA_KEY_FUNCTIONS + _LUA_HELPERS + body)

        self._create_key = script(_CREATE_KEY)
        self._revoke_key = script(_REVOKE_KEY)
        self._topup = script(_TOPUP)
        self._submit = script(_SUBMIT)
        self._claim = script(_CLAIM)
        self._renew = script(_RENEW)
        self._complete = script(_COMPLETE)
        self._fail = script(_FAIL)
        self._release = script(_RELEASE)
        self._expire_leases = script(_EXPIRE_LEASES)
        self._purge = script(_PURGE)
        self._stats = script(_STATS)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        expiry_grace_s: float = DEFAULT_EXPIRY_GRACE_S,
    ) -> RedisStore:
        """Connect to ``redis://HOST:PORT/DB`` (or ``rediss://``); nothing is sent until used."""
        return cls(connect(url), namespace=namespace, expiry_grace_s=expiry_grace_s)

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

    # --- keys and credits -------------------------------------------------------------------
    def create_key(self, key: ApiKey) -> None:
        fields = {
            "id": key.id,
            "key_hash": key.key_hash,
            "name": key.name,
            "balance_micro": str(_to_micro(key.balance_usd)),
            "rpm": str(key.rpm),
            "models": json.dumps(list(key.models)),
            "created_at": _float_text(key.created_at),
            "revoked": "1" if key.revoked else "0",
        }
        flat = [part for pair in fields.items() for part in pair]
        created = self._eval(
            self._create_key,
            [self.keys.api_key(key.id), self.keys.key_by_hash(key.key_hash), self.keys.all_keys()],
            key.id,
            *flat,
        )
        if not created:
            raise InvalidRequest(
                f"an API key with id {key.id!r} or the same secret already exists", field="key"
            )

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        key_id = self._run(lambda: self._redis.get(self.keys.key_by_hash(key_hash)))
        return self.get_key(cast(str, key_id)) if key_id is not None else None

    def get_key(self, key_id: str) -> ApiKey | None:
        data = self._hash(self.keys.api_key(key_id))
        return _key_from_hash(data) if data else None

    def list_keys(self) -> list[ApiKey]:
        def read() -> list[dict[str, str]]:
            pipe = self._redis.pipeline(transaction=False)
            for key_id in self._members(self.keys.all_keys()):
                pipe.hgetall(self.keys.api_key(key_id))
            return [data for data in pipe.execute() if data]

        keys = [_key_from_hash(data) for data in self._run(read)]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    def revoke_key(self, key_id: str) -> bool:
        return bool(self._eval(self._revoke_key, [self.keys.api_key(key_id)]))

    def topup(self, key_id: str, amount_usd: float) -> float:
        balance = self._eval(self._topup, [self.keys.api_key(key_id)], _to_micro(amount_usd))
        if balance is None:
            raise KeyError(key_id)
        return _to_usd(int(balance))

    # --- jobs -------------------------------------------------------------------------------
    def submit(self, job: Job, *, rpm: int, now: float) -> SubmitOutcome:
        cost_micro = _to_micro(job.cost_usd)
        window = math.floor(now / RATE_WINDOW_S)
        ttl_ms = max(1, math.ceil((job.expires_at - now + self.expiry_grace_s) * 1000))
        fields = {
            "id": job.id,
            "slug": job.slug,
            "key_id": job.key_id,
            "params": json.dumps(job.params),
            "status": JobStatus.QUEUED.value,
            "created_at": _float_text(job.created_at),
            "expires_at": _float_text(job.expires_at),
            "cost_micro": str(cost_micro),
            "attempts": "0",
            "extra": json.dumps(job.extra),
        }
        reply = self._eval(
            self._submit,
            [
                self.keys.api_key(job.key_id),
                self.keys.rate(job.key_id, window),
                self.keys.job(job.id),
                self.keys.slugs(),
                self.keys.expiry(),
            ],
            job.id,
            job.slug,
            cost_micro,
            rpm,
            RATE_KEY_TTL_S,
            ttl_ms,
            _float_text(job.expires_at),
            _float_text(job.created_at),
            *[part for pair in fields.items() for part in pair],
        )
        outcome = str(reply[0])
        if outcome == "unauthenticated":
            raise Unauthenticated("invalid API key", field="x-api-key")
        if outcome == "rate_limited":
            reset_at = float((window + 1) * RATE_WINDOW_S)
            retry_after_s = reset_at - now
            raise RateLimited(
                f"rate limit of {rpm} requests per minute reached: retry in {retry_after_s:.0f} s",
                retry_after_s=retry_after_s,
                limit=rpm,
                reset_at=reset_at,
            )
        if outcome == "insufficient":
            raise InsufficientCredits(
                f"Not enough credits to process request: this run costs "
                f"${_to_usd(cost_micro):.4f}, the balance is ${_to_usd(int(reply[1])):.4f}",
                field="x-api-key",
            )
        if outcome != "ok":  # pragma: no cover - the script has no other answer
            raise QwenServeError(f"unexpected reply from the submit script: {reply!r}")
        remaining = int(reply[2])
        return SubmitOutcome(
            remaining_usd=_to_usd(int(reply[1])),
            rate_limit_remaining=remaining if remaining >= 0 else None,
        )

    def get_job(self, job_id: str, *, now: float) -> Job | None:
        data = self._hash(self.keys.job(job_id))
        if not data or float(data["expires_at"]) <= now:
            return None
        return _job_from_hash(data)

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
    ) -> list[Job]:
        if limit <= 0:
            return []
        chosen = self._slugs(slugs)
        if not chosen:
            return []
        keys = [
            key
            for slug in chosen
            for key in (self.keys.queue(slug), self.keys.leases(slug), self.keys.requeued(slug))
        ]
        reply = self._eval(
            self._claim,
            keys,
            worker_id,
            _float_text(now),
            _float_text(now + lease_s),
            max_attempts,
            limit,
        )
        return [_job_from_hash(_pairs(flat)) for flat in reply]

    def renew_lease(self, job_id: str, worker_id: str, *, lease_s: float, now: float) -> bool:
        return bool(
            self._eval(
                self._renew, [self.keys.job(job_id)], job_id, worker_id, _float_text(now + lease_s)
            )
        )

    def complete(self, job_id: str, worker_id: str, result: JobResult, *, now: float) -> bool:
        return bool(
            self._eval(
                self._complete,
                [self.keys.job(job_id)],
                job_id,
                worker_id,
                json.dumps(result.to_dict()),
                _float_text(now),
            )
        )

    def fail(
        self, job_id: str, worker_id: str | None, *, kind: str, message: str, now: float
    ) -> bool:
        return bool(
            self._eval(
                self._fail,
                [self.keys.job(job_id)],
                job_id,
                worker_id or "",
                kind,
                message,
                _float_text(now),
            )
        )

    def release(self, job_id: str, worker_id: str, *, now: float) -> bool:
        return bool(self._eval(self._release, [self.keys.job(job_id)], job_id, worker_id))

    def expire_leases(self, *, now: float) -> int:
        leases = [self.keys.leases(slug) for slug in self._slugs(None)]
        if not leases:
            return 0
        return int(self._eval(self._expire_leases, leases, _float_text(now)))

    def purge_expired(self, *, now: float) -> list[Job]:
        purged: list[Job] = []
        while True:
            batch = self._eval(self._purge, [self.keys.expiry()], _float_text(now), PURGE_BATCH)
            purged.extend(_job_from_hash(_pairs(flat)) for flat in batch)
            if len(batch) < PURGE_BATCH:
                return purged

    def stats(self, *, now: float) -> QueueStats:
        rows = self._eval(self._stats, [self.keys.slugs()])
        queued: dict[str, int] = {}
        processing: dict[str, int] = {}
        oldest: float | None = None
        for slug, queued_count, processing_count, oldest_text in rows:
            if int(queued_count):
                queued[str(slug)] = int(queued_count)
            if int(processing_count):
                processing[str(slug)] = int(processing_count)
            if oldest_text:
                created_at = float(oldest_text)
                oldest = created_at if oldest is None else min(oldest, created_at)
        return QueueStats(
            queued_by_model=queued,
            processing_by_model=processing,
            oldest_queued_age_s=max(0.0, now - oldest) if oldest is not None else None,
        )


_ANNOUNCE = """
-- KEYS: workers hash, lapse zset; ARGV: prefix, worker id, info JSON, lapses_at, now
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
-- Forget workers that stopped announcing (killed) so the hash does not grow forever.
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])) do
  redis.call('HDEL', KEYS[1], gone)
  redis.call('ZREM', KEYS[2], gone)
end
return 1
"""


class RedisWorkerRegistry:
    """The worker registry (``qwenserve.store.workers``) in Redis: a hash of announcements and a
    sorted set of when each lapses, so a killed worker drops out on its own."""

    def __init__(self, client: redis.Redis, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self._redis = client
        self.keys = RedisKeys(namespace)
        self._announce = client.register_script(LUA_KEY_FUNCTIONS + _ANNOUNCE)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = DEFAULT_NAMESPACE) -> RedisWorkerRegistry:
        return cls(connect(url), namespace=namespace)

    def announce(self, info: WorkerInfo, *, ttl_s: float) -> None:
        with unavailable_as_503("the worker registry"):
            self._announce(
                keys=[self.keys.workers(), self.keys.workers_lapse()],
                args=[
                    self.keys.prefix,
                    info.worker_id,
                    info.to_json(),
                    _float_text(info.last_seen + ttl_s),
                    _float_text(info.last_seen),
                ],
            )

    def alive(self, *, now: float) -> list[WorkerInfo]:
        with unavailable_as_503("the worker registry"):
            lapse_key, since = self.keys.workers_lapse(), f"({_float_text(now)}"
            ids = sorted(cast(list[str], self._redis.zrangebyscore(lapse_key, since, "+inf")))
            if not ids:
                return []
            infos = cast(list[str | None], self._redis.hmget(self.keys.workers(), ids))
        return [WorkerInfo.from_json(text) for text in infos if text is not None]

    def remove(self, worker_id: str) -> None:
        with unavailable_as_503("the worker registry"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hdel(self.keys.workers(), worker_id)
            pipe.zrem(self.keys.workers_lapse(), worker_id)
            pipe.execute()

    def close(self) -> None:
        self._redis.close()
