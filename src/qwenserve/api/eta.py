"""How long a job will still take: estimated from what was measured, never invented.

Two measures, both in memory on each API node:

* ``Throughput`` is a subscriber of the process's one event-log reader (every node sees every
  job's transitions, whichever node or worker made them) and keeps, per model, the recent seconds
  per finished job: ``min(run time, gap since that model's previous completion)``, learnt first
  from what the log retained when the node started (a bounded read through that reader). The gap
  captures parallel workers and batches (four jobs of one batch ending together count about a
  quarter of a run each); the run time caps the long gaps of an idle server.
* ``StepRates`` measures a running job's seconds per denoising step from two progress reports
  this node read (the pace of the steps themselves), else from its start to its last report
  (which also counts loading and input fetching, so it errs long).

Each is None until there is something to measure: an ETA is null rather than a guess.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from qwenserve.jobs import JobEvent, JobEventType, JobProgress
from qwenserve.notify.follower import EventFollower
from qwenserve.store.base import Store

log = logging.getLogger("qwenserve.api")

SAMPLES_PER_MODEL = 20
MAX_TRACKED_JOBS = 10_000
HISTORY_EVENTS = 5_000
"""The most events of the retained log the pace learns from at start (one bounded read: 25
store reads of 200; the store reads the log oldest first, so a longer log seeds from its oldest
part, replaced by the newest as jobs finish: ``SAMPLES_PER_MODEL`` per model are kept)."""


@dataclass(frozen=True)
class QueueFigures:
    """A model's recent pace and load, as of the last refresh."""

    seconds_per_job: float | None
    processing: int


class Throughput:
    """Recent seconds per finished job of each model, from the events its reader hands it.

    Args:
        refresh_s: the oldest the figures may be when a queued job's ETA is asked for: the
            running counts are re-read as often, and the reader asked to catch up as often
            where its own thread does not keep reading.
    """

    def __init__(self, refresh_s: float = 1.0) -> None:
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._reader: EventFollower | None = None
        self._refreshed_at: float | None = None
        self._running_since: OrderedDict[str, float] = OrderedDict()
        self._last_completion: dict[str, float] = {}
        self._samples: dict[str, deque[float]] = {}
        self._processing: dict[str, int] = {}

    def follow(self, reader: EventFollower, *, history: int = HISTORY_EVENTS) -> None:
        """Take every event from ``reader`` (the process's one reader of the log), after
        learning from up to ``history`` events the log retained from before (a restarted node
        shows ETAs at once, not only after its next jobs finish)."""
        self._reader = reader
        reader.subscribe(self.on_event, history=history)

    def figures(self, store: Store, slug: str, *, now: float) -> QueueFigures:
        """The model's seconds per job (None: nothing finished lately) and jobs running now.

        Blocking (may make the reader read, and reads the running counts, at most every
        ``refresh_s``): call it off the event loop.
        """
        stale = self._refreshed_at is None or now - self._refreshed_at >= self.refresh_s
        if stale and self._reader is not None and not self._reader.running:
            self._reader.catch_up()  # no thread reads for it (an app without its lifespan)
        with self._lock:
            if stale:
                self._refreshed_at = now
                self._processing = dict(store.stats(now=now).processing_by_model)
            samples = self._samples.get(slug)
            per_job = sum(samples) / len(samples) if samples else None
            return QueueFigures(seconds_per_job=per_job, processing=self._processing.get(slug, 0))

    def on_event(self, event: JobEvent) -> None:
        """The reader's subscriber: a claim starts a run, a completion ends one (a sample)."""
        with self._lock:
            if event.type is JobEventType.PROCESSING:
                self._running_since[event.job_id] = event.at
                self._running_since.move_to_end(event.job_id)
                while len(self._running_since) > MAX_TRACKED_JOBS:
                    self._running_since.popitem(last=False)
            elif event.type is JobEventType.COMPLETED:
                self._completed(event.slug, event.job_id, event.at)
            elif event.type is not JobEventType.CANCEL_REQUESTED:
                self._running_since.pop(event.job_id, None)

    def _completed(self, slug: str, job_id: str, at: float) -> None:
        started = self._running_since.pop(job_id, None)
        previous = self._last_completion.get(slug)
        self._last_completion[slug] = at
        spans = []
        if started is not None:
            spans.append(at - started)
        if previous is not None:
            spans.append(at - previous)
        if spans:
            samples = self._samples.setdefault(slug, deque(maxlen=SAMPLES_PER_MODEL))
            samples.append(max(0.0, min(spans)))


def queue_eta_s(position: int, figures: QueueFigures) -> float | None:
    """Seconds until a queued job with ``position`` jobs ahead of it finishes: the jobs ahead
    and those running now, then itself, each at the model's recent pace. None when unmeasured."""
    if figures.seconds_per_job is None:
        return None
    return round((position + figures.processing + 1) * figures.seconds_per_job, 1)


class StepRates:
    """Seconds per denoising step of running jobs, from the progress reports this node read."""

    def __init__(self, capacity: int = MAX_TRACKED_JOBS) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._first: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def seconds_per_step(
        self, job_id: str, progress: JobProgress, started_at: float | None
    ) -> float | None:
        """The pace between the first report seen and this one; else since ``started_at``."""
        with self._lock:
            first = self._first.get(job_id)
            if first is None or progress.step < first[0]:  # new, or a new attempt started over
                first = (progress.step, progress.updated_at)
                self._first[job_id] = first
                while len(self._first) > self.capacity:
                    self._first.popitem(last=False)
        first_step, first_at = first
        if progress.step > first_step and progress.updated_at > first_at:
            return (progress.updated_at - first_at) / (progress.step - first_step)
        if started_at is not None and progress.step > 0 and progress.updated_at > started_at:
            return (progress.updated_at - started_at) / progress.step
        return None

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._first.pop(job_id, None)


def running_eta_s(
    progress: JobProgress, seconds_per_step: float | None, *, now: float
) -> float | None:
    """Seconds until the remaining steps are done (less the time since the last report); None
    when no pace was measured yet."""
    if seconds_per_step is None:
        return None
    remaining = (progress.total_steps - progress.step) * seconds_per_step
    return round(max(0.0, remaining - max(0.0, now - progress.updated_at)), 1)
