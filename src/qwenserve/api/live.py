"""What a watcher of an unfinished job sees beyond its status: where it waits, how far it got,
and about how long it will take. Dialect-free: each API shapes ``LiveView.fields()`` its way.

The fields, all additive to the four statuses (clients that only read ``status`` never notice):

* QUEUED: ``queue_position`` (jobs of its model the fair claim takes before it, 0: next:
  weighted fair queuing between keys, FIFO within a key; ``Store.queue_position``) and
  ``eta_s`` (that many jobs, and those running, at the model's recent pace).
* PROCESSING with progress: ``progress: {step, total_steps, fraction}`` and ``eta_s``.
* PROCESSING without progress: ``waiting: true``: a worker holds it but has not started
  denoising (it waits behind the batch that worker runs, or loads its model or inputs);
  ``eta_s`` is null.
* ``cancel_requested: true`` while a cancel of a running job is pending.

``eta_s`` is the estimated seconds until the job ends, null while nothing was measured
(``api/eta.py``). Finished jobs get none of these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenserve.api.eta import queue_eta_s, running_eta_s
from qwenserve.api.jobs import check_owned
from qwenserve.api.services import Services
from qwenserve.jobs import Job, JobProgress, JobStatus


@dataclass(frozen=True)
class LiveView:
    """A job's live state at one read (see the module docstring for the fields)."""

    job: Job
    queue_position: int | None = None
    eta_s: float | None = None

    @property
    def progress(self) -> JobProgress | None:
        return self.job.progress if self.job.status is JobStatus.PROCESSING else None

    @property
    def waiting(self) -> bool:
        return self.job.status is JobStatus.PROCESSING and self.job.progress is None

    def fields(self) -> dict[str, Any]:
        """The JSON fields added to a status body."""
        status = self.job.status
        out: dict[str, Any] = {}
        if status is JobStatus.QUEUED:
            out["queue_position"] = self.queue_position
            out["eta_s"] = self.eta_s
        elif status is JobStatus.PROCESSING:
            progress = self.progress
            if progress is None:
                out["waiting"] = True
            else:
                out["progress"] = progress_fields(progress)
            out["eta_s"] = self.eta_s
        if not status.is_terminal and self.job.cancel_requested_at is not None:
            out["cancel_requested"] = True
        return out


def progress_fields(progress: JobProgress) -> dict[str, Any]:
    return {
        "step": progress.step,
        "total_steps": progress.total_steps,
        "fraction": round(progress.fraction, 4),
    }


def read_live_view(services: Services, job: Job, *, now: float) -> LiveView:
    """``job``'s live view: its queue position and the ETAs. Blocking (store reads for a
    queued job): call it off the event loop, in the same trip as the job's own read."""
    if job.status is JobStatus.QUEUED:
        position = services.store.queue_position(job.id, now=now)
        if position is None:  # claimed (or cancelled) since it was read: show what it is now
            fresh = services.store.get_job(job.id, now=now)
            if fresh is None or fresh.status is JobStatus.QUEUED:
                return LiveView(job)
            return read_live_view(services, fresh, now=now)
        figures = services.throughput.figures(services.store, job.slug, now=now)
        return LiveView(job, queue_position=position, eta_s=queue_eta_s(position, figures))
    if job.status is JobStatus.PROCESSING and job.progress is not None:
        pace = services.step_rates.seconds_per_step(job.id, job.progress, job.started_at)
        return LiveView(job, eta_s=running_eta_s(job.progress, pace, now=now))
    if job.status.is_terminal:
        services.step_rates.forget(job.id)
    return LiveView(job)


async def live_view(services: Services, job: Job) -> LiveView:
    """``job``'s live view, read off the event loop (see ``read_live_view``)."""
    view: LiveView = await services.call(read_live_view, services, job, now=services.clock())
    return view


async def owned_live_view(services: Services, key_id: str, request_id: str) -> LiveView:
    """The caller's job and its live view in ONE trip off the event loop (a status poll is the
    hottest read: each trip costs more than the reads themselves).

    Raises:
        UnknownRequest: not this key's job, unknown, or expired.
    """

    def read() -> LiveView:
        now = services.clock()
        job = check_owned(services.store.get_job(request_id, now=now), key_id, request_id)
        return read_live_view(services, job, now=now)

    view: LiveView = await services.call(read)
    return view
