"""The end of every job a worker held: encode → media → complete, or fail, give back, drop.

Results are encoded and stored on one finisher thread, so encoding and disk overlap the next
job's denoising. Every ending is one atomic store call that checks this worker still owns the
job (a job is never completed twice, never refunded twice) and appends the ending to the
store's event log. What follows an ending (stored inputs deleted, ...) is not done here: the
event the store call returned goes to ``notify.Endings`` at once (the one handler of every
kind of ending, whoever made it), and the in-process ``on_job_done`` callback is only the fast
path for waiters in this process (``notify/``). Which ending a job gets is decided here, once:
its stop reason (``worker/control.py``) first, else the error that ended it.

A store outage is ridden out (``worker/retry.py``): each ending is retried, and an outage that
outlasts the retries never turns into a failed job: the job is let go (no longer heartbeated),
its lease runs out and it runs again. Nothing here raises for a store outage, so a job is never
left held with nobody to end it. A media store (S3 bucket) outage at the finish is retried too,
the image kept (``media_retry_s``); one that outlasts it fails the job, refunded, with kind
``media_unavailable``: running it again would only meet the same bucket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from qwenserve.errors import (
    ContentPolicyViolation,
    InferenceError,
    MediaUnavailable,
    QwenServeError,
    ServiceUnavailable,
    StartTimeout,
    error_kind,
)
from qwenserve.jobs import CANCELLED, Job, JobEvent, JobResult, JobStatus
from qwenserve.media.encode import encode_image
from qwenserve.media.storage import MediaStore, new_media_id
from qwenserve.notify.endings import Endings
from qwenserve.policy import OUTPUT_BLOCKED
from qwenserve.store.rules import START_TIMEOUT_MESSAGE
from qwenserve.worker.control import Clock, JobControl, StopReason
from qwenserve.worker.retry import StoreRetry

if TYPE_CHECKING:
    from qwenserve.runtime.config import GeneratedImage
    from qwenserve.store.base import Store
    from qwenserve.worker.inputs import Prepared
    from qwenserve.worker.screening import OutputScreen

log = logging.getLogger("qwenserve.worker")

CANCEL_MESSAGE = "cancelled by its owner"
MEDIA_LOST_MESSAGE = (
    "the image was generated but could not be stored: the media store stayed unreachable "
    "(refunded; send the request again)"
)


class Finisher:
    """Ends the jobs of one worker (see the module docstring).

    Args:
        on_job_done: called with the job id after each ending (any thread), for in-process
            waiters; the store's event log announces it to everyone else.
        output_screen: the content policy's check of each image before it is encoded and
            stored (``worker/screening.py``); a blocked image is never stored.
    """

    def __init__(
        self,
        *,
        store: Store,
        media: MediaStore,
        control: JobControl,
        worker_id: str,
        clock: Clock,
        on_job_done: Callable[[str], None] | None = None,
        retry: StoreRetry | None = None,
        media_retry: StoreRetry | None = None,
        output_screen: OutputScreen | None = None,
        endings: Endings | None = None,
    ) -> None:
        self.store = store
        self.output_screen = output_screen
        self.retry = retry or StoreRetry()
        self.media_retry = media_retry or self.retry
        """How a finished image's put rides out a media store outage (``media_retry_s``)."""
        self.media = media
        self.control = control
        self.worker_id = worker_id
        self.clock = clock
        self.on_job_done = on_job_done
        self.endings = endings or Endings(store, media, clock=clock)
        """Handed each ending this finisher makes (the process's shared one, set by the
        composition root; else its own)."""
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"{worker_id}-finish")

    def submit_result(self, prepared: Prepared, generated: GeneratedImage) -> None:
        """Encode, store and complete on the finisher thread (overlapping the next job)."""
        self._thread.submit(self._finish, prepared, generated)

    def submit_end(self, job: Job) -> None:
        """End a stopped job on the finisher thread (off the engine's or heartbeat's path);
        nothing when someone else is ending it already."""
        if self.control.claim_ending(job.id):
            self._thread.submit(self._end, job, None)

    def wait(self) -> None:
        """Block until every result handed over so far is stored."""
        self._thread.submit(lambda: None).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def _finish(self, prepared: Prepared, generated: GeneratedImage) -> None:
        job = prepared.job
        if self.control.stop_reason(job.id) in (StopReason.CANCELLED, StopReason.LOST):
            self.end(job)  # its image is discarded; a drain (SHUTDOWN) still stores it
            return
        if not self.control.claim_ending(job.id):
            return  # ended already (cancelled at a step boundary)
        try:
            # A blocked image is dropped before encoding: it never reaches the media store.
            if not self._blocked(job, generated):
                self._store_result(prepared, generated)
        except ServiceUnavailable:
            log.error("job %s: the store stayed unavailable; its lease decides", job.id)
        except Exception as error:
            log.exception("job %s: storing the result failed", job.id)
            try:
                self._fail(job, InferenceError(describe_crash(error)))
            except ServiceUnavailable:
                log.error("job %s: the store stayed unavailable; its lease decides", job.id)
        finally:
            self.control.drop(job.id)
        self._notify(job.id)

    def _store_result(self, prepared: Prepared, generated: GeneratedImage) -> None:
        """Encode, store and complete (a job that is no longer ours keeps no media of ours)."""
        job, request = prepared.job, prepared.request
        encode_started = time.perf_counter()
        data = encode_image(generated.image, request.image_format, request.quality)
        encode_time_s = time.perf_counter() - encode_started
        media_id = new_media_id()
        try:
            self.media_retry.call(
                f"job {job.id}: storing its image",
                lambda: self.media.put(
                    media_id, data, request.content_type, expires_at=job.expires_at
                ),
            )
        except MediaUnavailable:
            # The bucket stayed unreachable through the retries (the image was kept until
            # now): running the job again would meet the same bucket, so it fails, refunded.
            self._fail(job, MediaUnavailable(MEDIA_LOST_MESSAGE))
            return
        result = JobResult(
            media_id=media_id,
            content_type=request.content_type,
            width=generated.width,
            height=generated.height,
            seed=generated.seed,
            inference_time_s=generated.inference_time_s,
            size_bytes=len(data),
            encode_time_s=encode_time_s,
        )
        completed = self._complete(job, result)
        if completed is not None:
            self._ended(completed, job)
            outcome = f"completed ({generated.width}x{generated.height}, seed {generated.seed})"
        else:
            self.media.delete(media_id)  # someone else owns the job now; keep one result
            outcome = "discarded (job no longer ours)"
        log.info("job %s %s", job.id, outcome)

    def _blocked(self, job: Job, generated: GeneratedImage) -> bool:
        """Whether the output screen blocked ``job``'s image (then it failed the job)."""
        screen = self.output_screen
        if screen is None or not screen.check.blocks(generated.image, what=f"job {job.id} output"):
            return False
        self._fail(job, ContentPolicyViolation(OUTPUT_BLOCKED), refund=not screen.charge)
        return True

    def _complete(self, job: Job, result: JobResult) -> JobEvent | None:
        """Complete ``job`` with ``result``, retried through an outage; its ``completed`` event
        (None: not ours). A retry refused because the lost first try was applied is still our
        completion: the job holds our media (its event is then read from the log)."""
        event = self.retry.call(
            f"job {job.id}: completing it",
            lambda: self.store.complete(job.id, self.worker_id, result, now=self.clock()),
        )
        if event is not None:
            return event
        stored = self.retry.call(
            f"job {job.id}: reading it", lambda: self.store.get_job(job.id, now=self.clock())
        )
        if not (
            stored is not None
            and stored.status is JobStatus.COMPLETED
            and stored.result is not None
            and stored.result.media_id == result.media_id
        ):
            return None
        logged = self.retry.call(
            f"job {job.id}: reading its events", lambda: self.store.job_events(job.id)
        )
        return next((e for e in reversed(logged) if e.type.is_terminal), None)

    def end(self, job: Job, error: QwenServeError | None = None) -> None:
        """End ``job`` without a result, by its stop reason, else as failed with ``error``:
        SHUTDOWN gives it back, CANCELLED fails it as cancelled, LOST drops it. Does nothing
        when someone else is ending it already."""
        if self.control.claim_ending(job.id):
            self._end(job, error)

    def _end(self, job: Job, error: QwenServeError | None) -> None:
        reason = self.control.stop_reason(job.id)
        try:
            if reason is StopReason.LOST:
                log.info("job %s abandoned (no longer ours)", job.id)
            elif reason is StopReason.SHUTDOWN:
                if self._release(job):
                    log.info("job %s released (shutdown)", job.id)
            elif reason is StopReason.CANCELLED:
                self._fail(job, None)
            else:
                self._fail(job, error or InferenceError("inference failed: internal error"))
        except ServiceUnavailable:
            log.error("job %s: the store stayed unavailable; its lease decides", job.id)
        finally:
            self.control.drop(job.id)
        self._notify(job.id)

    def end_stopped(self, prepared: list[Prepared], runnable: set[str]) -> list[Prepared]:
        """Ends the jobs not in ``runnable`` (stopped before they ran); returns the others."""
        for p in prepared:
            if p.job.id not in runnable:
                self.end(p.job)
        return [p for p in prepared if p.job.id in runnable]

    def end_late(self, prepared: list[Prepared]) -> list[Prepared]:
        """Ends (refunded) the jobs whose start deadline (``X-Start-Timeout``) passed while they
        waited in this worker, e.g. in its look-ahead: their compute has not begun. Returns the
        others, in order."""
        now, kept = self.clock(), []
        for p in prepared:
            if p.job.start_by is not None and p.job.start_by <= now:
                self.end(p.job, StartTimeout(START_TIMEOUT_MESSAGE))
            else:
                kept.append(p)
        return kept

    def give_back(self, job: Job, why: str) -> None:
        """Return a claimed job to the queue, its attempt given back (never started here)."""
        if not self.control.claim_ending(job.id):
            return
        try:
            self._release(job)
            log.info("job %s released (%s)", job.id, why)
        except ServiceUnavailable:
            log.error("job %s: the store stayed unavailable; its lease decides", job.id)
        finally:
            self.control.drop(job.id)

    def _fail(self, job: Job, error: QwenServeError | None, *, refund: bool = True) -> None:
        """FAILED (refunded unless not ``refund``) with ``error``, or as cancelled by its owner
        when None."""
        kind = CANCELLED if error is None else error_kind(error)
        message = CANCEL_MESSAGE if error is None else error.message
        failed = self.retry.call(
            f"job {job.id}: failing it",
            lambda: self.store.fail(
                job.id, self.worker_id, kind=kind, message=message, now=self.clock(), refund=refund
            ),
        )
        if failed is not None:
            self._ended(failed, job)
            log.info("job %s failed (%s: %s)", job.id, kind, message)

    def _release(self, job: Job) -> bool:
        """Give ``job`` back (or, its owner having asked to cancel it, end it as cancelled)."""
        event = self.retry.call(
            f"job {job.id}: giving it back",
            lambda: self.store.release(job.id, self.worker_id, now=self.clock()),
        )
        if event is not None:
            self._ended(event, job)
        return event is not None

    def claim_ended(self, events: Iterable[JobEvent]) -> None:
        """Endings a claim made on the way (given up after ``max_attempts``, past its start
        deadline, cancelled with its worker gone): handled now, as this worker's own are,
        rather than when the event-log reader gets to them. Never raises."""
        for event in events:
            if not event.type.is_terminal:
                continue
            try:
                self.endings.handle([event])
                self._notify(event.job_id)
            except Exception:
                log.warning("job %s: handling its ending failed", event.job_id, exc_info=True)

    def _ended(self, event: JobEvent, job: Job) -> None:
        """Hand an ending this worker made to the endings handler (a requeue is none). Never
        fails the job: a handler's trouble is logged."""
        try:
            self.endings.handle([event], job)
        except Exception:
            log.warning("job %s: handling its ending failed", job.id, exc_info=True)

    def _notify(self, job_id: str) -> None:
        if self.on_job_done is not None:
            self.on_job_done(job_id)


def describe_crash(error: BaseException) -> str:
    """What a client may read about an unexpected failure: never the trace."""
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return "inference failed: out of memory"
    return "inference failed: internal error in the engine"
