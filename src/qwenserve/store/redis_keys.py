"""Every Redis key name qwenserve uses, declared once for Python and for the Lua scripts.

All keys live under one namespace prefix (``<namespace>:``, ``qs:`` by default), so several
deployments, or tests, can share one Redis server without seeing each other. The layout::

    key:<key_id>            hash    an API key: key_hash, name, balance_micro, rpm,
                                    models (JSON), created_at, revoked (0/1), max_queued
    keyhash:<sha256>        string  the id of the key with that hash
    keys                    set     every key id (for listing)
    rate:<key_id>:<minute>  string  submits admitted in that minute window (INCR + EXPIRE)
    job:<job_id>            hash    a job: every Job field (JSON for params and result;
                                    progress_step/_total/_at, cancel_requested_at) plus
                                    ``entry``, the id of its stream entry
    queue:<slug>            stream  one entry (job, created_at) per job not yet finished;
                                    one consumer group, ``workers``; every entry is handed
                                    out at submit to ``waiting``, then XCLAIMed by its worker
    leases:<slug>           zset    PROCESSING jobs scored by lease_until
    waiting:<slug>          zset    every QUEUED job of the model scored by its ``fifo``
                                    (a submit counter kept in the job hash): submit order
    fairq:<slug>:<key_id>   zset    the key's QUEUED jobs of the model, scored the same (its
                                    FIFO under weighted fair queuing, store/fair.py)
    fairkeys:<slug>         zset    key ids with QUEUED jobs of the model scored by the key's
                                    tag (raised lazily: a score below ``fairtags`` is stale)
    fairtags                hash    key id -> its tag (virtual finish time); '' -> the
                                    cluster's virtual time
    fairorder:<slug>        zset    "<key_id> <job_id>" of every QUEUED job of the model,
                                    scored by its projected start in the fair order (the job
                                    hash's ``fair_start``): ZRANK is its queue position
    fairproj                hash    key id -> the projected finish of its QUEUED jobs
    fifo                    string  the submit counter
    entries:<slug>          hash    job id -> its stream entry, for the jobs in waiting:<slug>
                                    (so a job whose hash Redis expired leaves no entry behind)
    running:<key_id>        set     the ids of the key's PROCESSING jobs (its max_running)
    fair:ready              string  set once the jobs queued before fair queuing have joined
                                    the fair sets (``migrate_fair.lua``, before the first claim)
    slugs                   set     every slug that has a queue
    queued                  set     the ids of every QUEUED job (SCARD: QWENSERVE_MAX_QUEUED)
    keyqueued:<key_id>      set     the ids of the key's QUEUED jobs (its max_queued)
    startby                 zset    QUEUED jobs with a start deadline, scored by it
    expiry                  zset    every job scored by expires_at (for purge_expired)
    events                  stream  the event log: one entry per job transition (job_id,
                                    key_id, slug, type, at, attempt, error_kind, error)
    events:trim             zset    "<event id> <job id>" scored by when the event may go
                                    (its ``at`` + the job's result TTL), for purge_expired
    jobevents:<job_id>      stream  the same entries of one job, under the same ids (for a
                                    job's own event stream); a TTL past the job's
    webhook:<job_id>        hash    the delivery of a job's ending to its webhook URL
                                    (store.webhooks.DELIVERY_FIELDS, owner, lease_until)
    webhooks:due            zset    pending deliveries scored by when they may be claimed
                                    (next attempt due, or their lease running out)
    webhooks:cursor         string  the event id the webhook dispatchers read the log after
    idem:<sha256>           hash    an idempotency key (sha256 of "<key_id>\0<Idempotency-Key>"):
                                    body_hash, job_id, expires_at; a Redis TTL of 24 h
    hist:<job_id>           hash    a request's history record (request_id, key_id, slug,
                                    status, created_at, day, finished_at, cost_micro,
                                    inference_time_s, error_kind, error, prompt, expires_at);
                                    outlives the job, until purged after history_ttl_s
    histkey:<key_id>        zset    the key's job ids scored by created_at (equal scores in job
                                    id order: stable cursors)
    history:expiry          zset    job ids scored by when their record goes
    usage:<key_id>:<day>    hash    per UTC day number of submission: "<slug>:count",
                                    "<slug>:cost_micro" (charged now), "<slug>:gpu_ms"
    usage:expiry            zset    "<key_id> <day>" scored by when the counters go
    workers                 hash    worker id -> WorkerInfo JSON
    workers:lapse           zset    worker ids scored by when their announcement lapses
    media:<media_id>        hash    data, content_type, expires_at
    media:expiry            zset    media ids scored by expires_at
    wake                    channel pub/sub: a slug is published when a job of it becomes
                                    claimable (submit, release), so idle workers claim at once
    done                    channel pub/sub: a job id is published when the job ends
                                    (completed, failed, or refunded at expiry), so API nodes
                                    answer the POST /v1 waiting for it at once
    cancel                  channel pub/sub: a job id is published when its owner asks to
                                    cancel it while it runs, so every worker process reads
                                    the event log at once (the holder stops it next step)

The Lua scripts receive the prefix as their first argument and build per-slug and per-job names
(and the channels') with ``LUA_KEY_FUNCTIONS``, generated here from the same constants.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DEFAULT_NAMESPACE = "qs"
CONSUMER_GROUP = "workers"
WAITING_CONSUMER = "waiting"
"""The group's placeholder consumer holding the entries of jobs that wait (a claim picks by
fair order, not stream order, and XCLAIMs the picked entry to its worker)."""

_API_KEY = "key:"
_KEY_BY_HASH = "keyhash:"
_ALL_KEYS = "keys"
_RATE = "rate:"
_JOB = "job:"
_QUEUE = "queue:"
_LEASES = "leases:"
_WAITING = "waiting:"
_FAIR_QUEUE = "fairq:"
_FAIR_KEYS = "fairkeys:"
_FAIR_TAGS = "fairtags"
_FAIR_ORDER = "fairorder:"
_FAIR_PROJ = "fairproj"
_FIFO = "fifo"
_ENTRIES = "entries:"
_RUNNING = "running:"
_FAIR_READY = "fair:ready"
_SLUGS = "slugs"
_QUEUED = "queued"
_KEY_QUEUED = "keyqueued:"
_START_BY = "startby"
_EXPIRY = "expiry"
_EVENTS = "events"
_EVENTS_TRIM = "events:trim"
_JOB_EVENTS = "jobevents:"
_WEBHOOK = "webhook:"
_WEBHOOKS_DUE = "webhooks:due"
_WEBHOOKS_CURSOR = "webhooks:cursor"
_IDEMPOTENCY = "idem:"
_HISTORY = "hist:"
_HISTORY_BY_KEY = "histkey:"
_HISTORY_EXPIRY = "history:expiry"
_USAGE = "usage:"
_USAGE_EXPIRY = "usage:expiry"
_WORKERS = "workers"
_WORKERS_LAPSE = "workers:lapse"
_MEDIA = "media:"
_MEDIA_EXPIRY = "media:expiry"
_WAKE = "wake"
_DONE = "done"
_CANCEL = "cancel"

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

LUA_KEY_FUNCTIONS = f"""
local PREFIX = ARGV[1]
local GROUP = '{CONSUMER_GROUP}'
local WAITING_CONSUMER = '{WAITING_CONSUMER}'
local function api_key_key(key_id) return PREFIX .. '{_API_KEY}' .. key_id end
local function job_key(job_id) return PREFIX .. '{_JOB}' .. job_id end
local function queue_key(slug) return PREFIX .. '{_QUEUE}' .. slug end
local function leases_key(slug) return PREFIX .. '{_LEASES}' .. slug end
local function waiting_key(slug) return PREFIX .. '{_WAITING}' .. slug end
local function fair_queue_key(slug, key_id)
  return PREFIX .. '{_FAIR_QUEUE}' .. slug .. ':' .. key_id
end
local function fair_keys_key(slug) return PREFIX .. '{_FAIR_KEYS}' .. slug end
local function fair_tags_key() return PREFIX .. '{_FAIR_TAGS}' end
local function fair_order_key(slug) return PREFIX .. '{_FAIR_ORDER}' .. slug end
local function fair_proj_key() return PREFIX .. '{_FAIR_PROJ}' end
local function slugs_key() return PREFIX .. '{_SLUGS}' end
local function fifo_key() return PREFIX .. '{_FIFO}' end
local function entries_key(slug) return PREFIX .. '{_ENTRIES}' .. slug end
local function running_key(key_id) return PREFIX .. '{_RUNNING}' .. key_id end
local function queued_key() return PREFIX .. '{_QUEUED}' end
local function key_queued_key(key_id) return PREFIX .. '{_KEY_QUEUED}' .. key_id end
local function start_by_key() return PREFIX .. '{_START_BY}' end
local function events_key() return PREFIX .. '{_EVENTS}' end
local function events_trim_key() return PREFIX .. '{_EVENTS_TRIM}' end
local function job_events_key(job_id) return PREFIX .. '{_JOB_EVENTS}' .. job_id end
local function webhook_key(job_id) return PREFIX .. '{_WEBHOOK}' .. job_id end
local function history_key(job_id) return PREFIX .. '{_HISTORY}' .. job_id end
local function history_by_key_key(key_id) return PREFIX .. '{_HISTORY_BY_KEY}' .. key_id end
local function history_expiry_key() return PREFIX .. '{_HISTORY_EXPIRY}' end
local function usage_expiry_key() return PREFIX .. '{_USAGE_EXPIRY}' end
local function usage_key(key_id, day) return PREFIX .. '{_USAGE}' .. key_id .. ':' .. day end
local function wake_channel() return PREFIX .. '{_WAKE}' end
local function done_channel() return PREFIX .. '{_DONE}' end
local function cancel_channel() return PREFIX .. '{_CANCEL}' end
"""
"""Lua prelude for every script: key builders reading the prefix from ``ARGV[1]``."""


@dataclass(frozen=True)
class RedisKeys:
    """Key names under one namespace.

    Raises:
        ValueError: the namespace is empty, too long or has characters outside [A-Za-z0-9_.-]
            (a ``:`` or a brace would change how keys nest or hash).
    """

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        if not _NAMESPACE_RE.match(self.namespace):
            raise ValueError(f"invalid Redis namespace {self.namespace!r}: use [A-Za-z0-9_.-]")

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:"

    def api_key(self, key_id: str) -> str:
        return f"{self.prefix}{_API_KEY}{key_id}"

    def key_by_hash(self, key_hash: str) -> str:
        return f"{self.prefix}{_KEY_BY_HASH}{key_hash}"

    def all_keys(self) -> str:
        return f"{self.prefix}{_ALL_KEYS}"

    def rate(self, key_id: str, window: int) -> str:
        """The counter of ``key_id``'s submits in minute window number ``window``."""
        return f"{self.prefix}{_RATE}{key_id}:{window}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}{_JOB}{job_id}"

    def queue(self, slug: str) -> str:
        return f"{self.prefix}{_QUEUE}{slug}"

    def leases(self, slug: str) -> str:
        return f"{self.prefix}{_LEASES}{slug}"

    def fair_ready(self) -> str:
        return f"{self.prefix}{_FAIR_READY}"

    def waiting(self, slug: str) -> str:
        return f"{self.prefix}{_WAITING}{slug}"

    def slugs(self) -> str:
        return f"{self.prefix}{_SLUGS}"

    def queued(self) -> str:
        """Every QUEUED job's id (the cluster's queue limit counts it)."""
        return f"{self.prefix}{_QUEUED}"

    def key_queued(self, key_id: str) -> str:
        """The ids of ``key_id``'s QUEUED jobs (its ``max_queued`` counts it)."""
        return f"{self.prefix}{_KEY_QUEUED}{key_id}"

    def running(self, key_id: str) -> str:
        """The ids of ``key_id``'s PROCESSING jobs (its ``max_running`` counts it)."""
        return f"{self.prefix}{_RUNNING}{key_id}"

    def start_by(self) -> str:
        """QUEUED jobs with a start deadline, scored by it."""
        return f"{self.prefix}{_START_BY}"

    def expiry(self) -> str:
        return f"{self.prefix}{_EXPIRY}"

    def events(self) -> str:
        """The event log stream (every job)."""
        return f"{self.prefix}{_EVENTS}"

    def events_trim(self) -> str:
        """Event ids (with their job's id) scored by when purge_expired may trim them."""
        return f"{self.prefix}{_EVENTS_TRIM}"

    def job_events(self, job_id: str) -> str:
        """One job's events, under the same ids as in ``events``."""
        return f"{self.prefix}{_JOB_EVENTS}{job_id}"

    def webhook(self, job_id: str) -> str:
        """The delivery of ``job_id``'s ending to its webhook."""
        return f"{self.prefix}{_WEBHOOK}{job_id}"

    def webhooks_due(self) -> str:
        return f"{self.prefix}{_WEBHOOKS_DUE}"

    def webhooks_cursor(self) -> str:
        return f"{self.prefix}{_WEBHOOKS_CURSOR}"

    def idempotency(self, key_id: str, idempotency_key: str) -> str:
        """An API key's ``Idempotency-Key`` record (hashed: the header may hold any printable
        character, and the pair must not be ambiguous)."""
        digest = hashlib.sha256(f"{key_id}\0{idempotency_key}".encode()).hexdigest()
        return f"{self.prefix}{_IDEMPOTENCY}{digest}"

    def history(self, job_id: str) -> str:
        """A request's history record (outlives the job)."""
        return f"{self.prefix}{_HISTORY}{job_id}"

    def history_by_key(self, key_id: str) -> str:
        """The key's requests scored by created_at."""
        return f"{self.prefix}{_HISTORY_BY_KEY}{key_id}"

    def history_expiry(self) -> str:
        return f"{self.prefix}{_HISTORY_EXPIRY}"

    def usage(self, key_id: str, day: int) -> str:
        """The key's usage counters of UTC day number ``day`` (``store.history.day_number``)."""
        return f"{self.prefix}{_USAGE}{key_id}:{day}"

    def usage_expiry(self) -> str:
        return f"{self.prefix}{_USAGE_EXPIRY}"

    def workers(self) -> str:
        return f"{self.prefix}{_WORKERS}"

    def workers_lapse(self) -> str:
        return f"{self.prefix}{_WORKERS_LAPSE}"

    def media(self, media_id: str) -> str:
        return f"{self.prefix}{_MEDIA}{media_id}"

    def media_expiry(self) -> str:
        return f"{self.prefix}{_MEDIA_EXPIRY}"

    def wake(self) -> str:
        """The pub/sub channel a slug is published on when a job of it becomes claimable."""
        return f"{self.prefix}{_WAKE}"

    def done(self) -> str:
        """The pub/sub channel a job id is published on when the job ends (any terminal state)."""
        return f"{self.prefix}{_DONE}"

    def cancel(self) -> str:
        """The pub/sub channel a job id is published on when its owner asks to cancel it while
        a worker runs it."""
        return f"{self.prefix}{_CANCEL}"
