"""What the API handlers share: the store, media, the completion hub, settings and the clock,
plus the one submit path that v1 and v2 both use (so limits and credits are one mechanism)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from qwenserve.accounts.keys import authorize
from qwenserve.api.waiting import CompletionHub
from qwenserve.catalog import GenerationRequest, get_model, validate_request
from qwenserve.config import Settings
from qwenserve.errors import InvalidRequest
from qwenserve.jobs import Job, JobStatus
from qwenserve.media.inline import forget, store_inline_images
from qwenserve.media.storage import MediaStore
from qwenserve.store.base import ApiKey, Store, SubmitOutcome
from qwenserve.store.workers import WorkerInfo, WorkerRegistry

MAX_BODY_BYTES = 64 * 1024 * 1024

log = logging.getLogger("qwenserve.api")


@dataclass
class Services:
    """Everything a handler needs, built by the composition root and kept on ``app.state``."""

    settings: Settings
    store: Store
    media: MediaStore
    hub: CompletionHub = field(default_factory=CompletionHub)
    clock: Callable[[], float] = time.time
    registry: WorkerRegistry | None = None
    on_submitted: Callable[[str], None] | None = None
    """Called with each accepted job's id (wakes in-process workers at once)."""

    def workers(self) -> list[WorkerInfo]:
        """Workers alive anywhere (from their announcements), for /healthz and /metrics."""
        return self.registry.alive(now=self.clock()) if self.registry is not None else []

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a (blocking) store or media call off the event loop."""
        return await run_in_threadpool(fn, *args, **kwargs)

    def base_url(self, request: Request) -> str:
        """Where clients reach us: --public-url behind a proxy, else the address they called."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")


@dataclass(frozen=True)
class Submitted:
    job: Job
    request: GenerationRequest
    outcome: SubmitOutcome


async def read_json_body(request: Request) -> Any:
    """The body as JSON; malformed or oversized bodies are a 400 saying so."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not body.strip():
        raise InvalidRequest("request body is empty: send a JSON object with the parameters")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"malformed JSON body: {error}") from None


async def submit(services: Services, key: ApiKey, slug: str, body: Any) -> Submitted:
    """Validate, authorize, and enqueue atomically with the credit debit and rate limit."""
    spec = get_model(slug)
    authorize(key, slug)
    request = validate_request(slug, body)
    now = services.clock()
    settings = services.settings
    expires_at = now + settings.result_ttl_s
    stored: list[str] = []
    if request.images:  # inline images: checked now (400), kept out of the job record
        request, stored = await services.call(
            store_inline_images,
            request,
            services.media,
            expires_at=expires_at,
            max_bytes=settings.max_input_bytes,
            max_pixels=settings.max_input_pixels,
        )
    job = Job(
        id=str(uuid.uuid4()),
        slug=slug,
        key_id=key.id,
        params=request.to_dict(),
        status=JobStatus.QUEUED,
        created_at=now,
        expires_at=expires_at,
        cost_usd=settings.price_for(slug, spec.price_usd),
    )
    try:
        outcome = await services.call(services.store.submit, job, rpm=key.rpm, now=now)
    except BaseException:  # refused (429, 406) or the store is down: nothing is kept
        if stored:
            await services.call(forget, services.media, stored)
        raise
    log.info("job %s accepted slug=%s key=%s cost=%.4f", job.id, slug, key.id, job.cost_usd)
    if services.on_submitted is not None:
        services.on_submitted(job.id)
    return Submitted(job=job, request=request, outcome=outcome)


async def wait_for_end(services: Services, job_id: str, timeout_s: float) -> Job | None:
    """The job once terminal; the last seen state at the deadline; None if it vanished."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with services.hub.watch(job_id) as event:
        while True:
            job: Job | None = await services.call(
                services.store.get_job, job_id, now=services.clock()
            )
            remaining = deadline - loop.time()
            if job is None or job.status.is_terminal or remaining <= 0:
                return job
            await services.hub.sleep_until_notified(event, remaining)


def submit_headers(submitted: Submitted) -> dict[str, str]:
    headers = {
        "X-Request-ID": submitted.job.id,
        "x-remaining-credits": f"{submitted.outcome.remaining_usd:.6f}",
    }
    if submitted.outcome.rate_limit_remaining is not None:
        headers["x-rate-limit-remaining"] = str(submitted.outcome.rate_limit_remaining)
    return headers
