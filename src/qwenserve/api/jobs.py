"""Submit, await and cancel: the one job path every dialect shares.

Segmind's v1 (submit and wait) and v2 (submit, poll, cancel), and any later dialect, go through
these calls, so limits, credits, durability and cancellation are one mechanism. Dialects only
shape requests and responses; status codes come from the error tree (``api/errors.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from qwenserve.accounts.keys import authorize
from qwenserve.api import idempotency
from qwenserve.api.admission import admit
from qwenserve.api.body import parse_json
from qwenserve.api.services import Services
from qwenserve.catalog import GenerationRequest, get_model
from qwenserve.errors import ContentPolicyViolation, InvalidRequest, UnknownRequest, error_kind
from qwenserve.jobs import Job, JobStatus
from qwenserve.media.inline import forget, store_inline_images
from qwenserve.media.previews import new_preview_prefix
from qwenserve.policy import PROMPT_BLOCKED
from qwenserve.store.base import ApiKey, Cancelled, Idempotency, SubmitOutcome
from qwenserve.store.rules import IDEMPOTENCY_HEADER

log = logging.getLogger("qwenserve.api")

START_TIMEOUT_HEADER = "X-Start-Timeout"
"""Seconds a job may wait for its compute to begin; later, it ends unrun (``start_timeout``),
refunded (``Store.claim``)."""


@dataclass(frozen=True)
class Submitted:
    """An accepted job (durable: the store committed it) and its admission figures."""

    job: Job
    outcome: SubmitOutcome

    @property
    def request(self) -> GenerationRequest:
        """The job's typed request, as admission fixed it."""
        return self.job.request

    @property
    def replayed(self) -> bool:
        """An ``Idempotency-Key`` seen before: ``job`` is the one the first submit made."""
        return self.outcome.replay_of is not None


@dataclass(frozen=True)
class Awaited:
    """What waiting on a job came to: the job as last read (None once it vanished, i.e.
    expired), and whether the caller went away first."""

    job: Job | None
    disconnected: bool = False


async def read_json_body(request: Request) -> Any:
    """The body as JSON (``api/body.py``: size bounded as it streams in by ``BodyLimit``, depth
    and number literals bounded while decoding); a body that breaks a bound is a 4xx saying so."""
    return parse_json(await request.body())


def start_timeout(request: Request) -> float | None:
    """The request's ``X-Start-Timeout`` in seconds, or None when it has none.

    Raises:
        InvalidRequest: naming the header, when it is not a positive, finite number of seconds.
    """
    value = request.headers.get(START_TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequest(
            f"{START_TIMEOUT_HEADER} must be a positive number of seconds, got {value[:40]!r}",
            field=START_TIMEOUT_HEADER,
        )
    return seconds


async def submit(
    services: Services,
    key: ApiKey,
    slug: str,
    body: Any,
    *,
    start_timeout_s: float | None = None,
    partial_images: int = 0,
    wake: bool = True,
    webhook_url: str | None = None,
    idempotency_key: str | None = None,
    idempotency_record: Idempotency | None = None,
) -> Submitted:
    """Validate, authorize, and enqueue atomically with the credit debit and rate limit.

    ``start_timeout_s`` (``X-Start-Timeout``): a job not started by then ends FAILED
    (``start_timeout``), refunded.
    ``partial_images``: previews the worker stores while it denoises (``media/previews.py``).
    ``webhook_url`` (checked by the caller) is kept with the job: its ending is POSTed there.
    ``wake=False`` leaves waking in-process workers (``Services.on_submitted``) to the caller,
    which submits several jobs that should be claimed together.
    ``idempotency_key``: the client's ``Idempotency-Key``; a repeat of an earlier submit (same
    key and body, same API key, within 24 h) answers with the earlier job (``replayed``),
    nothing charged. ``idempotency_record`` instead: one job of a set a key covers, its
    record made by the caller (``idempotency.for_set``).
    With the content policy on, a request whose text it blocks is still admitted (key, rate
    limit and idempotency checked) but recorded FAILED (``content_policy``) at no cost and
    never queued: the returned job is FAILED, so v1 answers its error and v2 a request id
    whose poll says FAILED, as Segmind does for its own blocks.

    Raises:
        UnknownModel, Forbidden: before anything is kept.
        InvalidRequest: every bad field any submit-time check finds (``api/admission.py``),
            before anything is kept.
        RateLimited, InsufficientCredits: the store refused it; nothing is kept or charged.
        QueueFull (503), KeyQueueFull (429): the cluster's or the key's queue limit is
            reached (``QWENSERVE_MAX_QUEUED``, the key's ``max_queued``); nothing kept or charged.
        Conflict: the idempotency key was used with another body (naming the header).
        UnknownRequest: the idempotency key's job has expired meanwhile.
    """
    spec = get_model(slug)
    authorize(key, slug)
    seeds = idempotency.SeedRecorder()
    request = await admit(services, spec, body, seed_source=seeds)
    idem = idempotency_record
    if idempotency_key is not None:
        idem = idempotency.for_request(idempotency_key, slug, request, seed_drawn=seeds.drawn)
    if partial_images > 0:
        request = dataclasses.replace(
            request, partial_images=partial_images, preview_id=new_preview_prefix()
        )
    now = services.clock()
    settings = services.settings
    expires_at = now + settings.result_ttl_s
    job_id = str(uuid.uuid4())
    refusal = refuse_by_policy(services, request, job_id)
    stored: list[str] = []
    if request.images and refusal is None:  # inline images: checked now (400), kept apart
        request, stored = await services.call(
            store_inline_images,
            request,
            services.media,
            expires_at=expires_at,
            max_bytes=settings.max_input_bytes,
            max_pixels=settings.max_input_pixels,
        )
    job = Job(
        id=job_id,
        key_id=key.id,
        request=request,
        status=JobStatus.QUEUED,
        created_at=now,
        expires_at=expires_at,
        cost_usd=settings.price_for(slug, spec.price_usd),
        webhook_url=webhook_url,
        start_by=now + start_timeout_s if start_timeout_s is not None else None,
    )
    if refusal is not None:  # recorded as ended: polled like any job, never queued or charged
        job = dataclasses.replace(
            job,
            request=dataclasses.replace(request, images=()),  # never run: no inline image kept
            status=JobStatus.FAILED,
            cost_usd=0.0,
            error=refusal.message,
            error_kind=error_kind(refusal),
            finished_at=now,
        )
    try:
        outcome = await services.call(
            services.store.submit,
            job,
            rpm=key.rpm,
            now=now,
            idempotency=idem,
            max_queued=settings.max_queued,
        )
    except BaseException:  # refused (429, 406, 503) or the store is down: nothing is kept
        if stored:
            await services.call(forget, services.media, stored)
        raise
    if outcome.replay_of is not None:
        if stored:
            await services.call(forget, services.media, stored)
        return await _replayed(services, outcome)
    if refusal is not None:
        log.warning(
            "job %s blocked by the content policy (%s) slug=%s key=%s",
            job.id,
            refusal.field,
            slug,
            key.id,
        )
        return Submitted(job=job, outcome=outcome)
    log.info("job %s accepted slug=%s key=%s cost=%.4f", job.id, slug, key.id, job.cost_usd)
    if wake and services.on_submitted is not None:
        services.on_submitted(job.id)
    return Submitted(job=job, outcome=outcome)


async def _replayed(services: Services, outcome: SubmitOutcome) -> Submitted:
    """The answer to a repeated submit: the job its idempotency key first made."""
    assert outcome.replay_of is not None
    original: Job | None = await services.call(
        services.store.get_job, outcome.replay_of, now=services.clock()
    )
    if original is None:
        raise UnknownRequest(
            f"request '{outcome.replay_of}', made earlier with this {IDEMPOTENCY_HEADER}, has "
            "expired: use a new key for a new request",
            field=IDEMPOTENCY_HEADER,
        )
    log.info("job %s: submit replayed by its idempotency key", original.id)
    return Submitted(job=original, outcome=outcome)


def refuse_by_policy(
    services: Services, request: GenerationRequest, job_id: str
) -> ContentPolicyViolation | None:
    """The content policy's refusal of ``request``'s text (a blocked term in ``prompt`` or
    ``negative_prompt``), or None. The prompt itself is logged only with
    ``log_blocked_prompts``; the refusal's message never says what matched."""
    policy = services.prompt_policy
    if policy is None:
        return None
    fields = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    field = policy.blocked_field(fields)
    if field is None:
        return None
    if services.settings.log_blocked_prompts:
        log.warning("job %s: blocked %s: %r", job_id, field, fields[field])
    return ContentPolicyViolation(PROMPT_BLOCKED, field=field)


async def owned_job(services: Services, key: ApiKey, request_id: str) -> Job:
    """The caller's job; another key's, unknown and expired ids all read as 404 alike.

    Raises:
        UnknownRequest: not this key's job, unknown, or expired.
    """
    job: Job | None = await services.call(services.store.get_job, request_id, now=services.clock())
    return check_owned(job, key.id, request_id)


def check_owned(job: Job | None, key_id: str, request_id: str) -> Job:
    """``job`` if it is ``key_id``'s; else UnknownRequest (another key's job reads as unknown)."""
    if job is None or job.key_id != key_id:
        raise UnknownRequest(f"request '{request_id}' not found (unknown or expired)")
    return job


async def await_end(
    services: Services,
    job_id: str,
    timeout_s: float,
    *,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> Awaited:
    """Wait until the job is terminal, ``timeout_s`` passed, or ``disconnected()`` says the
    caller left (checked at each wake-up, at most ``wait_poll_s`` apart).

    Woken at once by the completion hub; re-reads the store as the fallback.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with services.hub.watch(job_id) as event:
        while True:
            job: Job | None = await services.call(
                services.store.get_job, job_id, now=services.clock()
            )
            remaining = deadline - loop.time()
            if job is None or job.status.is_terminal or remaining <= 0:
                return Awaited(job)
            if disconnected is not None and await disconnected():
                return Awaited(job, disconnected=True)
            await services.hub.sleep_until_notified(event, remaining)


async def cancel(services: Services, key_id: str, job_id: str) -> Job:
    """Its owner stops a job (``Store.cancel``): a queued one ends at once, FAILED as
    cancelled and refunded; a running one is asked to stop at its next denoising step (the
    request is in the event log; ``on_cancel_requested`` makes this process read it now).

    A job that ended here gets what every ending gets (``Services.endings``: its stored inline
    inputs deleted, ...) before this returns, and the event-log reader reads at once (its
    waiters, streams and webhook). Returns the job as it now is.

    Raises:
        UnknownRequest: unknown, expired, or another key's.
        Conflict: it had already ended (``job_status`` says how).
    """
    cancelled: Cancelled = await services.call(
        services.store.cancel, job_id, key_id, now=services.clock()
    )
    job = cancelled.job
    if cancelled.events:
        await services.call(services.endings.handle, cancelled.events, job)
        services.events.poke()
    if job.status.is_terminal:
        log.info("job %s cancelled before it ran; refunded", job.id)
    else:
        if services.on_cancel_requested is not None:
            services.on_cancel_requested(job.id)
        log.info("job %s: cancel requested while %s", job.id, job.status.value)
    return job
