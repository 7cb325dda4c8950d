"""The Store protocol: every state change of jobs, keys, credits and rate limits goes through it.

A backend makes each method one atomic step with its datastore's own primitives (a SQLite
``BEGIN IMMEDIATE`` transaction, a Redis Lua script or MULTI), so two API nodes or a worker and an
API node can never interleave half-done changes. The same contract suite
(``tests/store/contract.py``) runs against every backend.

Time is always passed in (``now``, Unix seconds) so leases, TTLs and rate-limit windows can be
tested with an injected clock.

Job control goes through three calls: a worker's ``heartbeat`` (renew its leases, record
progress, learn which jobs it lost or must stop), an owner's ``cancel``, and the event log
(``events``, ``job_events``): every transition of a job appends one ``JobEvent`` in the same
atomic step, so whoever follows the log (completion hub, live streams, webhooks) misses nothing,
even across a crash.

Every transition also returns the events it appended (``complete``/``fail``/``release``: the
event, None when nothing changed; ``submit``: ``SubmitOutcome.event``; ``claim``, ``cancel`` and
``purge_expired``: ``.events`` on what they return, give-ups and missed start deadlines
included), so the caller may act on its own ending at once (``notify.Endings.handle``) without
waiting for the log's reader; the reader stays the one path that sees every ending.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qwenserve.jobs import Job, JobEvent, JobResult, Progress
from qwenserve.store.history import HistoryFilter, HistoryPage, UsageRow
from qwenserve.store.webhooks import DeliveryStatus, WebhookAttempt, WebhookDelivery


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: never the key itself, only its SHA-256 hash."""

    id: str
    key_hash: str
    name: str
    balance_usd: float
    rpm: int
    """Requests per minute allowed; 0 means unlimited."""
    models: tuple[str, ...] = ()
    """Slugs this key may use; empty means every model."""
    created_at: float = 0.0
    revoked: bool = False
    max_queued: int = 0
    """The most jobs this key may have QUEUED at once (a submit past it is a 429); 0: no limit."""
    weight: float = 1.0
    """Its share of the GPUs against other waiting keys (weighted fair queuing, ``store.fair``)."""
    max_running: int = 0
    """The most jobs this key may have PROCESSING at once, cluster-wide; 0: no limit."""


@dataclass(frozen=True)
class SubmitOutcome:
    """What an accepted submit reports back to the client."""

    remaining_usd: float
    rate_limit_remaining: int | None
    """Requests left in the current minute window (None when the key is unlimited)."""
    replay_of: str | None = None
    """With an idempotency key seen before (same body, within its TTL): the id of the job that
    first submit created. Nothing was charged or counted this time. None: a new job."""
    event: JobEvent | None = None
    """The event the submit appended: ``queued``, or ``failed`` for a job the API refused
    itself; None for a replay (nothing appended)."""


class Claimed(list[Job]):
    """What ``Store.claim`` took (a list of jobs, oldest first) and every event the claim
    appended: a ``processing`` per job taken, a ``failed`` per job it ended on the way (given up
    after ``max_attempts``, cancelled with its worker gone, past its start deadline)."""

    def __init__(self, jobs: Iterable[Job] = (), events: Iterable[JobEvent] = ()) -> None:
        super().__init__(jobs)
        self.events: tuple[JobEvent, ...] = tuple(events)


class Purged(list[Job]):
    """What ``Store.purge_expired`` deleted (the jobs as they were, so their media can go) and
    the endings it appended on the way: expired before they finished, missed start deadlines."""

    def __init__(self, jobs: Iterable[Job] = (), events: Iterable[JobEvent] = ()) -> None:
        super().__init__(jobs)
        self.events: tuple[JobEvent, ...] = tuple(events)


@dataclass(frozen=True)
class Cancelled:
    """What ``Store.cancel`` did: the job as it now is, and the events it appended
    (``cancel_requested`` and/or the ``failed`` ending; none when asked again while pending)."""

    job: Job
    events: tuple[JobEvent, ...] = ()


@dataclass(frozen=True)
class Idempotency:
    """A client's ``Idempotency-Key`` for one submit, scoped to its API key.

    ``body_hash`` is a canonical hash of the validated request and its slug: the same key with
    another body is refused (409) rather than answered with the first job.
    """

    key: str
    body_hash: str


@dataclass(frozen=True)
class KeyLoad:
    """A key's jobs waiting and running now (``Store.key_loads``, for /metrics)."""

    key_id: str
    name: str
    queued: int
    running: int


@dataclass(frozen=True)
class QueueStats:
    """Operational figures for status pages and /metrics."""

    queued_by_model: dict[str, int] = field(default_factory=dict)
    processing_by_model: dict[str, int] = field(default_factory=dict)
    waiting_by_model: dict[str, int] = field(default_factory=dict)
    """PROCESSING jobs that have not started denoising (no progress yet): claimed ahead behind
    a running batch, or loading their inputs. Included in ``processing_by_model``; a queue
    depth that counts what still waits for the engine adds them to ``queued_by_model``."""
    oldest_queued_age_s: float | None = None

    def waiting_for_engine(self) -> dict[str, int]:
        """Per model: jobs not yet denoising (QUEUED, or claimed but waiting): the queue a
        watcher cares about, and what /metrics and /healthz report as queued."""
        models = set(self.queued_by_model) | set(self.waiting_by_model)
        return {m: self.queued_by_model.get(m, 0) + self.waiting_by_model.get(m, 0) for m in models}

    def denoising(self) -> dict[str, int]:
        """Per model: PROCESSING jobs that have started denoising."""
        return {
            m: count - self.waiting_by_model.get(m, 0)
            for m, count in self.processing_by_model.items()
        }


@dataclass(frozen=True)
class Heartbeat:
    """The store's answer to a worker's heartbeat, for the jobs it listed."""

    owned: frozenset[str]
    """Still this worker's: leases renewed, progress recorded."""
    cancelled: frozenset[str]
    """Owned, but their owner asked to cancel them: the worker stops each and calls
    ``fail(..., kind=CANCELLED)``. A subset of ``owned``."""
    lost: frozenset[str]
    """Not this worker's any more (reclaimed after its lease ran out, ended, expired): the
    worker drops them and must not report a result."""


class Store(Protocol):
    """Jobs, keys, credits and rate limits, each operation atomic."""

    # --- keys and credits -------------------------------------------------------------------
    def create_key(self, key: ApiKey) -> None:
        """Store a new key (its hash, balance, rpm and allowed models)."""

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked ones included (the caller checks ``revoked``)."""

    def get_key(self, key_id: str) -> ApiKey | None: ...

    def list_keys(self) -> list[ApiKey]: ...

    def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked; False when no such key."""

    def topup(self, key_id: str, amount_usd: float) -> float:
        """Add credit; returns the new balance. Raises UnknownRequest-free KeyError if missing."""

    def update_key(
        self,
        key_id: str,
        *,
        rpm: int | None = None,
        max_queued: int | None = None,
        weight: float | None = None,
        max_running: int | None = None,
        balance_usd: float | None = None,
    ) -> ApiKey | None:
        """Change a key's limits and (``balance_usd``) set its balance, all in one atomic step
        (None: keep); returns the key as it now is, None if missing. ``topup`` adds instead."""

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
        """Accept ``job`` (status QUEUED) in one atomic step with its admission checks.

        In one transaction: refuse it while the store holds ``max_queued`` QUEUED jobs (> 0;
        QueueFull) or the key its own ``ApiKey.max_queued`` (KeyQueueFull), count the key's
        submits in the current minute (raise RateLimited when ``rpm`` > 0 and the count has
        reached it), debit ``job.cost_usd`` from the key's balance (raise InsufficientCredits
        when the balance is lower) and insert the job. Either all of it happens or none of it
        does. A job with ``start_by`` keeps it: ``claim`` and ``purge_expired`` end it
        (``start_timeout``, refunded) if it has not started by then.

        With ``idempotency``: when ``job.key_id`` already used that idempotency key within
        ``rules.IDEMPOTENCY_TTL_S``, nothing is admitted: the outcome's ``replay_of`` names the
        job the first submit created (same body hash), or Conflict is raised (another body).
        Otherwise the record is written in the same step as the job, so concurrent duplicates
        make exactly one job and one charge. A refused submit records nothing.

        A job the API refused itself (its content policy: ``job.status`` FAILED, with
        ``error_kind`` and ``error``) is recorded in the same step, FAILED from the start at no
        cost (nothing debited, whatever ``cost_usd`` says), never queued, its ending announced
        (a ``failed`` event) so pollers, webhooks and /metrics see it like any other. It passes
        the same key, idempotency and rate-limit checks: a blocked request is still a request.
        """

    def get_job(self, job_id: str, *, now: float) -> Job | None:
        """The job, or None when unknown or past its ``expires_at``."""

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
        """Take up to ``limit`` runnable jobs for this worker, oldest first (with the events
        the claim appended: ``Claimed.events``).

        First, QUEUED jobs (of any model) whose ``start_by`` has passed and which never started
        end FAILED (kind ``start_timeout``), refunded and announced (``rules.START_TIMEOUT_BATCH``
        at most per call; ``purge_expired`` ends them too, so an idle cluster does).

        Runnable: QUEUED, or PROCESSING with an expired lease (its worker died). Each claimed
        job becomes PROCESSING, owned by ``worker_id`` until ``now + lease_s``, with
        ``attempts`` raised by one and ``started_at`` set on its first claim. A job whose lease
        expired after ``max_attempts`` attempts is failed instead (and refunded), with a reason;
        one whose owner asked to cancel it ends as cancelled (refunded). Each claim announces a
        ``processing`` event. ``slugs`` limits the models taken (None: any).
        """

    def heartbeat(
        self, worker_id: str, progress: Mapping[str, Progress | None], *, lease_s: float, now: float
    ) -> Heartbeat:
        """A worker's one control call for every job it holds, in one atomic step.

        For each listed job this worker still owns (PROCESSING under ``worker_id``): extend the
        lease to ``now + lease_s`` and record its progress (with ``now``; None: no news, the last
        report stays). The answer says which are owned, which of those were cancelled, and which
        are lost. A cancel-requested job's lease is renewed too: its worker is alive and about to
        stop it.
        """

    def complete(
        self, job_id: str, worker_id: str, result: JobResult, *, now: float
    ) -> JobEvent | None:
        """PROCESSING → COMPLETED, only while ``worker_id`` still owns it; returns the
        ``completed`` event appended. None otherwise, so a job is never completed twice."""

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
        """→ FAILED with the error, refunding the job's cost, in one step; returns the
        ``failed`` event appended. With a worker id, only while that worker owns it; with None,
        any non-terminal job. None if not applied.
        ``refund=False`` keeps the charge (an output the content policy blocked, when the
        operator charges those): the key's balance and the history's cost stay as they were."""

    def release(self, job_id: str, worker_id: str, *, now: float) -> JobEvent | None:
        """Give a claimed job back to the queue (graceful shutdown): QUEUED again, the attempt
        it was charged given back, its progress cleared; returns the ``queued`` event. A job
        whose owner asked to cancel it is not queued again: it ends as cancelled (refunded; the
        ``failed`` event). None when not this worker's."""

    def cancel(self, job_id: str, key_id: str, *, now: float) -> Cancelled:
        """Its owner stops a job, in one atomic step; returns the job as it now is and the
        events appended.

        QUEUED: it ends at once, FAILED with ``error_kind=CANCELLED``, refunded. PROCESSING:
        the request is recorded (``cancel_requested_at``); the worker learns it from its
        heartbeat and fails the job as cancelled (refunded then), or completes it if it finished
        first. When that worker's lease has run out, the job ends as cancelled at once (here or
        in the next ``claim``) instead of running again. Asking again while a request is
        pending changes nothing.

        Raises:
            UnknownRequest: no such job, expired, or another key's.
            Conflict: the job already ended (``job_status`` says how).
        """

    def expire_leases(self, *, now: float) -> int:
        """Make every PROCESSING lease expire now (a restarted single-node server owns none of
        them any more); returns how many."""

    def purge_expired(self, *, now: float) -> Purged:
        """Delete jobs past ``expires_at``, refunding those that never finished (announced as
        ``failed``, kind ``EXPIRED``, or ``CANCELLED`` when a cancel was pending), end the
        QUEUED jobs whose start deadline passed (as ``claim`` does), and trim the
        event log of events past their retention; returns the jobs so their media can go too, and
        the endings it appended (``Purged.events``)."""

    def stats(self, *, now: float) -> QueueStats: ...

    def key_loads(self) -> list[KeyLoad]:
        """Every key with QUEUED or PROCESSING jobs now, with how many of each, by key id. Read
        from the counts the queue limits keep (no scan of the jobs): a cost in keys only."""

    def queue_position(self, job_id: str, *, now: float) -> int | None:
        """How many QUEUED jobs of the same model the fair claim takes before this one (0:
        next): its place in the order of projected starts (``store/sqlite/fair_order.py``), not
        submit order. None when the job is not QUEUED (or unknown, or expired)."""

    # --- history and usage -------------------------------------------------------------------
    def history(
        self,
        key_id: str,
        *,
        limit: int,
        cursor: str | None = None,
        where: HistoryFilter = HistoryFilter(),  # noqa: B008 - frozen, shared safely
    ) -> HistoryPage:
        """Up to ``limit`` of the key's history records matching ``where``, newest first (by
        created_at, then request id), after ``cursor`` (a page's ``next_cursor``).

        Raises:
            InvalidRequest: ``cursor`` is not one this store gave out.
        """

    def usage(self, key_id: str | None, *, since: float, until: float) -> list[UsageRow]:
        """Requests, charges and GPU seconds per UTC day, key and model, for the days from
        ``since``'s to ``until``'s (inclusive), of one key or (None) every key."""

    # --- the event log ----------------------------------------------------------------------
    def events(self, *, after: str | None = None, limit: int = 100) -> list[JobEvent]:
        """Up to ``limit`` events of every job, oldest first, after event id ``after`` (None:
        from the start of the log). Events are kept for their job's result TTL from when they
        happened, then trimmed by ``purge_expired``.

        Raises:
            InvalidRequest: ``after`` is not an event id of this store.
        """

    def job_events(self, job_id: str, *, after: str | None = None) -> list[JobEvent]:
        """Every event of one job still in the log, oldest first, after event id ``after`` (a
        client's Last-Event-ID). The caller checks that the job is the asker's.

        Raises:
            InvalidRequest: ``after`` is not an event id of this store.
        """

    def last_event_id(self) -> str | None:
        """The id of the newest event in the log (None when empty): where a consumer that only
        wants what happens from now on starts."""

    # --- webhooks (notify/webhooks.py) --------------------------------------------------------
    def webhook_secret(self, key_id: str, *, candidate: str, rotate: bool = False) -> str | None:
        """The key's webhook signing secret, set to ``candidate`` first when it has none (or
        when ``rotate``), in one atomic step; None when there is no such key."""

    def webhook_cursor(self) -> str | None:
        """The event id after which the webhook dispatchers read the log next (None: start)."""

    def enqueue_webhooks(self, events: Sequence[JobEvent], *, cursor: str, now: float) -> int:
        """In one atomic step: a pending delivery (due now, its ``event_id`` the event's) for
        each terminal event whose job named a webhook URL and has none yet, and the cursor moved
        to ``cursor``. Returns how many were added (idempotent: a re-read adds none)."""

    def claim_webhooks(
        self, owner: str, *, lease_s: float, now: float, limit: int = 10
    ) -> list[WebhookDelivery]:
        """Take up to ``limit`` pending deliveries that are due (or whose lease ran out), each
        leased to ``owner`` until ``now + lease_s``; deliveries older than their retention go."""

    def release_webhook_leases(self, *, now: float) -> int:
        """Every pending delivery leased to a dispatcher made claimable again at once (its
        attempts and due time kept), so a restart of the only node (a kill -9 mid-send) need
        not wait out the dead node's lease. Returns how many were released. Never while another
        node may be sending: only a server that is the store's one node calls it."""

    def record_webhook_attempt(
        self,
        job_id: str,
        owner: str,
        attempt: WebhookAttempt,
        *,
        status: DeliveryStatus,
        next_attempt_at: float | None,
        body: str,
        now: float,
    ) -> bool:
        """Append ``attempt`` and move the delivery to ``status`` (due again at
        ``next_attempt_at`` when pending), releasing the lease; ``body`` is kept from the first
        attempt on. False (nothing changed) unless ``owner`` holds it and it is pending."""

    def get_webhook(self, job_id: str) -> WebhookDelivery | None:
        """The delivery of ``job_id``'s ending (None before it ended, or without a webhook)."""

    def close(self) -> None: ...
