"""What every store decides the same way, written once: money, the rate window, and the words.

Money is integer micro-USD inside every store, so repeated debits and refunds are exact; it is
converted to float USD only at a store's edge. The refusals (401, 406, 409, 429) and the reasons
a job ends without running are built here, so both backends say the same thing.
"""

from __future__ import annotations

from qwenserve.errors import (
    Conflict,
    InsufficientCredits,
    InvalidRequest,
    KeyQueueFull,
    QueueFull,
    RateLimited,
    StartTimeout,
    Unauthenticated,
    UnknownRequest,
)

MICRO_PER_USD = 1_000_000
RATE_WINDOW_S = 60
"""Rate limits count admitted submits per key in windows of this many seconds."""

IDEMPOTENCY_TTL_S = 24 * 3600.0
"""How long a key's ``Idempotency-Key`` answers with the job it first created."""
IDEMPOTENCY_HEADER = "Idempotency-Key"

GIVE_UP_KIND = "InferenceError"
"""``error_kind`` of a job given up after its worker was lost ``max_attempts`` times."""


def to_micro(amount_usd: float) -> int:
    return round(amount_usd * MICRO_PER_USD)


def to_usd(amount_micro: int) -> float:
    return amount_micro / MICRO_PER_USD


def rate_limited(rpm: int, *, reset_at: float, now: float) -> RateLimited:
    """The 429 of a key that used its ``rpm`` submits in the window ending at ``reset_at``."""
    retry_after_s = reset_at - now
    return RateLimited(
        f"rate limit of {rpm} requests per minute reached: retry in {retry_after_s:.0f} s",
        retry_after_s=retry_after_s,
        limit=rpm,
        reset_at=reset_at,
    )


QUEUE_RETRY_AFTER_S = 10.0
"""``Retry-After`` of a submit refused because a queue is full: no window resets then, but a
queue drains (a client retrying sooner only adds load)."""

START_TIMEOUT_KIND = StartTimeout.kind or "start_timeout"
"""``error_kind`` of a job whose start deadline (``X-Start-Timeout``) passed before it started."""
START_TIMEOUT_MESSAGE = "not started before its start deadline (X-Start-Timeout); refunded"
START_TIMEOUT_BATCH = 100
"""The most jobs one claim or sweep ends for a missed start deadline (bounds the claim's cost;
the rest go in the next one)."""


def queue_full(limit: int) -> QueueFull:
    """The 503 of a submit while the cluster holds ``limit`` queued jobs (QWENSERVE_MAX_QUEUED)."""
    return QueueFull(
        f"the server's queue is full ({limit} jobs waiting): retry in {QUEUE_RETRY_AFTER_S:.0f} s",
        retry_after_s=QUEUE_RETRY_AFTER_S,
    )


def key_queue_full(limit: int) -> KeyQueueFull:
    """The 429 of a submit while the key has ``limit`` jobs queued (its ``max_queued``)."""
    return KeyQueueFull(
        f"this API key already has {limit} queued jobs, its limit (max_queued): retry once "
        "some have started",
        retry_after_s=QUEUE_RETRY_AFTER_S,
        limit=limit,
    )


def insufficient_credits(cost_micro: int, balance_micro: int) -> InsufficientCredits:
    """The 406 of a submit the balance cannot pay (Segmind's wording)."""
    return InsufficientCredits(
        f"Not enough credits to process request: this run costs ${to_usd(cost_micro):.4f}, "
        f"the balance is ${to_usd(balance_micro):.4f}",
        field="x-api-key",
    )


def invalid_key() -> Unauthenticated:
    """A key unknown or revoked by the time its submit reached the store."""
    return Unauthenticated("invalid API key", field="x-api-key")


def duplicate_key(key_id: str) -> InvalidRequest:
    return InvalidRequest(
        f"an API key with id {key_id!r} or the same secret already exists", field="key"
    )


def unknown_request(job_id: str) -> UnknownRequest:
    """Unknown, expired and another key's job look the same: ids are not probed."""
    return UnknownRequest(f"no request {job_id!r}", field="request_id")


def idempotency_mismatch(job_id: str, status: str) -> Conflict:
    """The 409 of an idempotency key reused with another body."""
    return Conflict(
        f"this {IDEMPOTENCY_HEADER} was used within the last 24 h with a different body "
        f"(request {job_id!r}): use a new key for a new request",
        job_status=status,
        field=IDEMPOTENCY_HEADER,
    )


def already_ended(job_id: str, status: str) -> Conflict:
    return Conflict(
        f"request {job_id!r} already ended ({status}): there is nothing to cancel",
        job_status=status,
        field="request_id",
    )


def invalid_event_id(after: str) -> InvalidRequest:
    return InvalidRequest(f"{after!r} is not an event id", field="last-event-id")


def gave_up_template(max_attempts: int) -> str:
    """The give-up reason with ``%d`` twice where the attempts go (Lua fills it in Redis)."""
    return (
        "the worker running this job was lost %d times; gave up after %d attempts "
        f"(max_attempts={max_attempts})"
    )


def gave_up_message(attempts: int, max_attempts: int) -> str:
    return gave_up_template(max_attempts) % (attempts, attempts)


CANCELLED_BEFORE_START = "cancelled by its owner before it started; refunded"
CANCELLED_WORKER_LOST = "cancelled by its owner; its worker stopped answering; refunded"
CANCELLED_RELEASED = "cancelled by its owner while its worker shut down; refunded"
CANCELLED_AT_EXPIRY = "cancelled by its owner; it expired before its worker stopped; refunded"
EXPIRED_QUEUED = "expired before a worker could run it; refunded"
EXPIRED_RUNNING = "expired before its worker finished it; refunded"
