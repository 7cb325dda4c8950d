"""One job's live events as Server-Sent Events (``GET /v2/requests/{id}/events``).

Each transition in the store's durable event log is one event named after it (``queued``,
``processing``, ``cancel_requested``, ``completed``, ``failed``) whose ``id`` is the log's
event id. Between transitions, ``progress`` events carry the live fields (queue position,
denoising progress, ETA; ``api/live.py``) whenever they change, and carry **no id**: SSE keeps
the last id it saw, so the id a client resumes from (``Last-Event-ID``) is always a
transition's, and a resume replays exactly the transitions after it, never one twice, none
lost. The stream ends after the terminal event (``completed`` or ``failed``); a job that had
already ended sends its transitions and ends at once. Transitions come from the process's one
reader of the event log (``notify/fanout.py``: one read per poll for every open stream, on any
API node, whichever process changed the job); at the start the job's own events are read once
(what was logged before the stream watched). Between transitions, the job itself is read every
``events_poll_s`` for its live fields (progress is not in the log).

``data`` is JSON: ``{"request_id", "status", "type", "at", "attempt"}`` plus ``error`` on
``failed`` and the URLs on the terminal event, or for ``progress`` ``{"request_id",
"status"}`` plus the live fields. A job that expired before its end was logged gets ``gone``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sse_starlette import ServerSentEvent

from qwenserve.api.live import live_view
from qwenserve.api.services import Services
from qwenserve.jobs import Job, JobEvent, JobEventType, JobStatus

STATUS_AFTER: dict[JobEventType, JobStatus] = {
    JobEventType.QUEUED: JobStatus.QUEUED,
    JobEventType.PROCESSING: JobStatus.PROCESSING,
    JobEventType.CANCEL_REQUESTED: JobStatus.PROCESSING,
    JobEventType.COMPLETED: JobStatus.COMPLETED,
    JobEventType.FAILED: JobStatus.FAILED,
}


def _sse(event: str, data: dict[str, Any], event_id: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=event, id=event_id)


def transition(event: JobEvent, links: dict[str, str]) -> ServerSentEvent:
    """A logged transition, with its log id."""
    data: dict[str, Any] = {
        "request_id": event.job_id,
        "status": STATUS_AFTER[event.type].value,
        "type": event.type.value,
        "at": event.at,
        "attempt": event.attempt,
    }
    if event.type is JobEventType.FAILED:
        data["error"] = event.error
    if event.type.is_terminal:
        data.update(links)
    return _sse(event.type.value, data, event.id)


def _ended_unlogged(job: Job, links: dict[str, str]) -> ServerSentEvent:
    """A terminal job whose ending left the log already (trimmed): said from the job, no id."""
    kind = JobEventType.COMPLETED if job.status is JobStatus.COMPLETED else JobEventType.FAILED
    data: dict[str, Any] = {
        "request_id": job.id,
        "status": job.status.value,
        "type": kind.value,
        "at": job.finished_at,
        "attempt": job.attempts,
        **links,
    }
    if job.status is JobStatus.FAILED:
        data["error"] = job.error
    return _sse(kind.value, data)


async def job_stream(
    services: Services,
    job: Job,
    *,
    after: str | None,
    backlog: Sequence[JobEvent],
    links: dict[str, str],
) -> AsyncIterator[ServerSentEvent]:
    """The events of ``job``: ``backlog`` (its logged transitions after ``after``, the
    client's Last-Event-ID, read and so validated before the response started), then live
    ones from the process's one reader of the log (``Services.feeds``)."""
    with services.feeds.watch(job.id) as feed:
        # Watching first, then reading what was logged meanwhile: nothing falls in between,
        # and the reader's copies of what is read here are dropped by id.
        logged = await _after(services, job.id, None)
        cursor = backlog[-1].id if backlog else after
        newer = logged if cursor is None else await _after(services, job.id, cursor)
        pending = [*backlog, *newer]
        # What the client had before (up to its Last-Event-ID): never sent again.
        seen = {e.id for e in logged} - {e.id for e in pending}
        had_end = any(e.type.is_terminal and e.id in seen for e in logged)
        last_live: dict[str, Any] | None = None
        while True:
            for event in pending:
                if event.id in seen:
                    continue
                seen.add(event.id)
                yield transition(event, links)
                if event.type.is_terminal:
                    return
            current: Job | None = await services.call(
                services.store.get_job, job.id, now=services.clock()
            )
            if current is None:
                yield _sse("gone", {"request_id": job.id, "error": "the request expired"})
                return
            if current.status.is_terminal:
                # Its ending was logged in the same step: the reader, asked to read now, hands
                # it over, else it is read here once before saying it from the job itself.
                services.events.poke()
                wait_s = max(services.settings.events_poll_s, 2 * services.events.poll_s)
                pending = await next_events(services, feed, wait_s)
                if not _ends(pending, seen):
                    pending += [e for e in await _after(services, job.id, None) if e.id not in seen]
                if _ends(pending, seen):
                    continue
                if not had_end:  # its end left the log already (trimmed): said from the job
                    yield _ended_unlogged(current, links)
                # else: the client's Last-Event-ID is at or after the end: it has it already.
                return
            live = (await live_view(services, current)).fields()
            steady = {k: v for k, v in live.items() if k != "eta_s"}  # ETAs tick every poll
            if steady != last_live:
                last_live = steady
                yield _sse(
                    "progress", {"request_id": job.id, "status": current.status.value, **live}
                )
            pending = await next_events(services, feed, services.settings.events_poll_s)


async def next_events(
    services: Services, feed: asyncio.Queue[JobEvent], timeout_s: float
) -> list[JobEvent]:
    """The job's next logged events from the reader, or none within ``timeout_s``. Where no
    thread of the reader runs (an app without its lifespan), it is asked to catch up: one
    shared read per poll period for every stream of the process."""
    if not services.events.running:
        await services.call(services.events.catch_up, timeout_s)
    try:
        first = await asyncio.wait_for(feed.get(), timeout=timeout_s)
    except TimeoutError:
        return []
    events = [first]
    while not feed.empty():
        events.append(feed.get_nowait())
    return events


async def _after(services: Services, job_id: str, cursor: str | None) -> list[JobEvent]:
    events: list[JobEvent] = await services.call(services.store.job_events, job_id, after=cursor)
    return events


def _ends(events: Sequence[JobEvent], seen: set[str]) -> bool:
    """Whether ``events`` hold an ending not sent yet."""
    return any(e.type.is_terminal and e.id not in seen for e in events)
