"""Job control: one heartbeat per worker carries every lease, every progress report and every
stop, so a worker makes one store call per period however many jobs and steps it has in hand.

The engine reports progress through ``on_step`` into memory here (never a store call per
denoising step); a background thread sends what changed with the next ``Store.heartbeat``
(``period_s``, at most about a second, so a watcher's progress is never much staler; a job's
start and its first step go at once, so "denoising" shows when it begins) and reads
the answer: jobs taken away are ``LOST``, jobs their owner cancelled are ``CANCELLED``. A cancel
request does not wait for the period: the event log's reader calls ``cancel_requested`` and
the heartbeat goes at once (``qwenserve.notify.cancel_requests``). A stop for the whole
worker (a drain that timed out) is ``SHUTDOWN``. Each held job has at most one stop reason,
and each reason says how the job ends:

=========== ===================================================================
SHUTDOWN    give it back to the queue (``Store.release``): it runs again
CANCELLED   end it FAILED, ``error_kind=cancelled`` (``Store.fail`` refunds it)
LOST        drop it: it is not this worker's any more, report nothing
=========== ===================================================================

A job is ended by exactly one party (the finisher, the engine thread at a step boundary, the
stop handler for a job that waits): each calls ``claim_ending`` first and only the first wins.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenserve.errors import ServiceUnavailable
from qwenserve.jobs import Job, Progress

if TYPE_CHECKING:
    from qwenserve.store.base import Store

log = logging.getLogger("qwenserve.worker")

Clock = Callable[[], float]

MAX_CONTROL_PERIOD_S = 1.0
"""Progress a watcher sees is at most about this stale."""


class StopReason(enum.Enum):
    """Why a held job must stop; the order is precedence (a lost job cannot be cancelled)."""

    SHUTDOWN = 1
    """The worker stops: give the job back to the queue."""
    CANCELLED = 2
    """Its owner cancelled it: end it as cancelled (refunded)."""
    LOST = 3
    """Another worker owns it now, or it ended elsewhere: drop it, report nothing."""


def control_period_s(lease_s: float) -> float:
    """How often a worker heartbeats: often enough for fresh progress, thrice per lease."""
    return max(0.01, min(MAX_CONTROL_PERIOD_S, lease_s / 3.0))


@dataclass
class _Held:
    job: Job
    running: bool = False
    progress: Progress | None = None
    """The latest report not yet sent (None: nothing new)."""
    stop: StopReason | None = None
    ending: bool = False
    stepped: bool = False
    """A step was reported (the first one is sent at once)."""


OnStopped = Callable[[Job, StopReason], None]


class JobControl:
    """The jobs one worker holds, their progress and stop reasons, and the heartbeat thread.

    Args:
        store: where the heartbeat goes.
        worker_id: whose jobs these are.
        lease_s: each heartbeat extends the leases to ``now + lease_s``.
        period_s: seconds between heartbeats (``control_period_s(lease_s)`` by default).
        clock: Unix time, injectable.
        on_stopped: called on the heartbeat thread for a job that got a stop reason while it was
            held but not running (claimed ahead, loading inputs): it can end at once. A running
            job's stop is acted on by the engine thread at its next step.
    """

    def __init__(
        self,
        store: Store,
        *,
        worker_id: str,
        lease_s: float,
        clock: Clock,
        period_s: float | None = None,
        on_stopped: OnStopped | None = None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.period_s = period_s if period_s is not None else control_period_s(lease_s)
        self.clock = clock
        self.on_stopped = on_stopped
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the thread -------------------------------------------------------------------------
    def start(self) -> None:
        """Heartbeat every ``period_s`` from now on (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"{self.worker_id}-control", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop heartbeating (held jobs keep their leases until these run out)."""
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def beat_soon(self) -> None:
        """Heartbeat now rather than at the end of the period (a batch started: show it)."""
        self._wake.set()

    def cancel_requested(self, job_id: str) -> bool:
        """Its owner asked to cancel ``job_id`` (the event log said so): if this worker holds
        it, heartbeat now, so the store's answer stops it before the engine's next step
        rather than a period later. The store stays the judge (a job this worker lost is
        ``LOST``, not cancelled). True when held here."""
        with self._lock:
            held = job_id in self._held
        if held:
            self.beat_soon()
        return held

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.period_s)
            self._wake.clear()
            if self._closed.is_set():
                break
            self.beat()

    def beat(self) -> None:
        """One heartbeat for every held job: renew leases, send new progress, learn stops."""
        with self._lock:
            reports = {job_id: held.progress for job_id, held in self._held.items()}
            for held in self._held.values():
                held.progress = None
        if not reports:
            return
        try:
            answer = self.store.heartbeat(
                self.worker_id, reports, lease_s=self.lease_s, now=self.clock()
            )
        except Exception as error:  # a store hiccup: leases outlast a few missed beats
            # An outage is one line (the store logged where); anything else, its traceback.
            outage = isinstance(error, ServiceUnavailable)
            log.warning(
                "worker %s: heartbeat failed: %s", self.worker_id, error, exc_info=not outage
            )
            with self._lock:  # resend what was not recorded, unless newer news came meanwhile
                for job_id, report in reports.items():
                    again = self._held.get(job_id)
                    if again is not None and again.progress is None:
                        again.progress = report
            return
        stopped = [(job_id, StopReason.LOST) for job_id in answer.lost]
        stopped += [(job_id, StopReason.CANCELLED) for job_id in answer.cancelled]
        for job, reason in self._stop(stopped):
            log.info("job %s: %s (seen by the heartbeat)", job.id, reason.name.lower())
            if self.on_stopped is not None:
                self.on_stopped(job, reason)

    def _stop(self, stops: Iterable[tuple[str, StopReason]]) -> list[tuple[Job, StopReason]]:
        """Record stop reasons; returns the newly stopped jobs that wait (not running)."""
        waiting: list[tuple[Job, StopReason]] = []
        with self._lock:
            for job_id, reason in stops:
                held = self._held.get(job_id)
                if held is None or (held.stop is not None and held.stop.value >= reason.value):
                    continue
                held.stop = reason
                if not held.running and not held.ending:
                    waiting.append((held.job, reason))
        return waiting

    # --- what the runner tells it -----------------------------------------------------------
    def hold(self, jobs: Iterable[Job]) -> None:
        """Claimed: heartbeat these from now on (waiting: no progress until they start)."""
        with self._lock:
            for job in jobs:
                self._held[job.id] = _Held(job)

    def begin(self, jobs: Sequence[Job], total_steps: int) -> list[Job]:
        """These jobs start denoising now: returns those that may run (no stop reason yet),
        marked running at step 0 of ``total_steps``; the rest must be ended, not run."""
        runnable = []
        with self._lock:
            for job in jobs:
                held = self._held.get(job.id)
                if held is None or held.stop is not None or held.ending:
                    continue
                held.running = True
                held.progress = Progress(0, max(1, total_steps))
                runnable.append(job)
        self.beat_soon()  # a watcher sees "denoising" now, not a period later
        return runnable

    def step(self, job_ids: Iterable[str], done: int, total: int) -> None:
        """The engine finished step ``done`` of ``total`` for these jobs (one batch)."""
        if total < 1:
            return
        report = Progress(min(max(done, 0), total), total)
        first = False
        with self._lock:
            for job_id in job_ids:
                held = self._held.get(job_id)
                if held is not None:
                    held.progress = report
                    first = first or (done >= 1 and not held.stepped)
                    held.stepped = held.stepped or done >= 1
        if first:  # denoising began: a watcher sees it now, and a short job shows progress
            self.beat_soon()

    def stop_all(self, reason: StopReason) -> None:
        """Stop every held job for ``reason`` (a drain that timed out: ``SHUTDOWN``)."""
        with self._lock:
            job_ids = list(self._held)
        self._stop((job_id, reason) for job_id in job_ids)

    def stop_reason(self, job_id: str) -> StopReason | None:
        with self._lock:
            held = self._held.get(job_id)
            return held.stop if held is not None else None

    def all_stopped(self, job_ids: Iterable[str]) -> bool:
        """True when none of these jobs should go on (each stopped, ending or dropped): the
        engine may stop the pipeline call."""
        with self._lock:
            return all(
                (held := self._held.get(job_id)) is None or held.stop is not None or held.ending
                for job_id in job_ids
            )

    def going_on(self, job_ids: Iterable[str]) -> set[str]:
        """Those of ``job_ids`` held, not stopped and not ending: they may (still) run."""
        with self._lock:
            return {
                job_id
                for job_id in job_ids
                if (held := self._held.get(job_id)) is not None
                and held.stop is None
                and not held.ending
            }

    def stopped_among(self, job_ids: Iterable[str]) -> list[Job]:
        """Those of ``job_ids`` with a stop reason that nobody is ending yet."""
        with self._lock:
            return [
                held.job
                for job_id in job_ids
                if (held := self._held.get(job_id)) is not None
                and held.stop is not None
                and not held.ending
            ]

    def claim_ending(self, job_id: str) -> bool:
        """The caller is about to end this job (complete, fail, release or abandon it): True
        for the first caller only. The job stays heartbeated until ``drop``."""
        with self._lock:
            held = self._held.get(job_id)
            if held is None or held.ending:
                return False
            held.ending = True
            return True

    def let_lapse(self, job: Job, max_attempts: int) -> bool:
        """Let ``job`` go as if this worker had died, for a job whose engine process died under
        it (``EngineCrashed``): one last heartbeat ends its lease now, so the next claim (here or
        anywhere) takes it again with this attempt counted. False, doing nothing, when it was
        its last attempt (``max_attempts``), when it has a stop reason (its ending says how it
        ends) or when someone else is ending it. A store outage changes nothing: the lease then
        runs out on its own."""
        if job.attempts >= max_attempts or self.stop_reason(job.id) is not None:
            return False
        if not self.claim_ending(job.id):
            return False
        try:
            self.store.heartbeat(self.worker_id, {job.id: None}, lease_s=0.0, now=self.clock())
            log.info(
                "job %s back to the queue (attempt %d of %d)", job.id, job.attempts, max_attempts
            )
        except Exception as error:
            log.warning("job %s: could not end its lease now (%s); it runs out", job.id, error)
        finally:
            self.drop(job.id)
        return True

    def drop(self, job_id: str) -> None:
        """The job ended (or went back): stop heartbeating it."""
        with self._lock:
            self._held.pop(job_id, None)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)
