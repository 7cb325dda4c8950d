"""The worker loop: claim → inputs → engine → finisher, with one control channel per worker.

A runner owns no state of its own that matters: the job's state lives in the store, and every
transition is one atomic store call that checks this worker still owns the job, so a worker that
was presumed dead (its lease expired and another worker took the job) can never complete it a
second time. The engine is injected (``ImageEngine``); this package never imports torch.

Each concern has its module: ``claims`` (routing order, batch-mates, the batch window on the
injected clock), ``control`` (one heartbeat per worker: leases, progress, stop reasons),
``finisher`` (encode → media → complete, or fail / give back / drop). This loop ties them:

- **Batching.** After claiming a job the engine can batch, the runner claims more jobs of the
  same model (up to ``max_batch``, waiting at most ``batch_window_s`` for them) and runs those
  with the same batch key as one pipeline call; the others go straight back to the queue.
- **Overlap.** Results are stored on the finisher thread while the runner already runs the next
  job; with ``prefetch`` on, the next job is claimed and its inputs loaded on a look-ahead
  thread while the current batch denoises (only for slugs no idle peer serves). A looked-ahead
  job waits with no progress: a watcher sees it as waiting, not denoising.
- **Stops.** A job stopped (or past its start deadline) while it waits ends at once; a running
  one at its next step: alone, the call stops; in a batch, only that job ends, the rest go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from qwenserve.errors import (
    EngineCrashed,
    InferenceError,
    OutOfMemory,
    QwenServeError,
    ServiceUnavailable,
)
from qwenserve.media.storage import MediaStore
from qwenserve.store.workers import WorkerInfo, WorkerRegistry
from qwenserve.worker.claims import Claimer, Sleep
from qwenserve.worker.config import WorkerConfig
from qwenserve.worker.control import Clock, JobControl, StopReason
from qwenserve.worker.engine import CancelCheck, CountsCompiles, ImageEngine, StepCallback
from qwenserve.worker.finisher import Finisher, describe_crash
from qwenserve.worker.inputs import InputLoader, Prepared
from qwenserve.worker.metrics import BATCH, INFERENCE, QUEUE_WAIT, StepTimer, WorkerMetrics
from qwenserve.worker.metrics import snapshot as metrics_snapshot
from qwenserve.worker.previews import preview_saver, wants_previews
from qwenserve.worker.retry import StoreRetry
from qwenserve.worker.screening import OutputScreen

if TYPE_CHECKING:
    from qwenserve.jobs import Job
    from qwenserve.notify.endings import Endings
    from qwenserve.runtime.config import GeneratedImage
    from qwenserve.store.base import Store

log = logging.getLogger("qwenserve.worker")

__all__ = ["ImageEngine", "InputLoader", "WorkerRunner", "WorkerState"]


@dataclass
class WorkerState:
    """What a runner is doing now, for the registry and `qwenserve status`."""

    current_job: str | None = None
    started_at: float = 0.0


class WorkerRunner:
    """Runs jobs from the store through the engine until stopped.

    ``clock`` (Unix seconds) and ``sleep`` are injectable: leases, progress times and the batch
    window follow them. ``on_job_done`` is called with each job id once it ended here (the fast
    path for waiters in this process; the store's event log announces every ending anyway).
    ``retry`` is how store calls that end a job ride out an outage (``worker/retry.py``).
    ``endings`` gets every ending this worker makes, its claims' give-ups included (the
    process's one ``notify.Endings``; None: one of its own).
    """

    def __init__(
        self,
        *,
        store: Store,
        media: MediaStore,
        engine: ImageEngine,
        inputs: InputLoader,
        config: WorkerConfig,
        clock: Clock = time.time,
        sleep: Sleep = time.sleep,
        on_job_done: Callable[[str], None] | None = None,
        registry: WorkerRegistry | None = None,
        retry: StoreRetry | None = None,
        output_screen: OutputScreen | None = None,
        endings: Endings | None = None,
    ) -> None:
        self.store = store
        self.media = media
        self.engine = engine
        self.inputs = inputs
        self.config = config
        self.clock = clock
        self.registry = registry
        self.state = WorkerState(started_at=clock())
        self.metrics = WorkerMetrics()
        """Figures for /metrics, sent with each announcement (``worker/metrics.py``)."""
        self.control = JobControl(
            store,
            worker_id=config.worker_id,
            lease_s=config.lease_s,
            period_s=config.control_period_s,
            clock=clock,
            on_stopped=lambda job, _reason: self.finisher.submit_end(job),
        )
        self.finisher = Finisher(
            store=store,
            media=media,
            control=self.control,
            worker_id=config.worker_id,
            clock=clock,
            on_job_done=on_job_done,
            retry=retry,
            # The store's retry (its clock and sleep) with the media outage budget.
            media_retry=replace(retry or StoreRetry(), budget_s=config.media_retry_s),
            output_screen=output_screen,
            endings=endings,
        )
        self.claims = Claimer(
            store=store,
            engine=engine,
            config=config,
            control=self.control,
            finisher=self.finisher,
            registry=registry,
            clock=clock,
            sleep=sleep,
        )
        self._stopping = threading.Event()
        self._work_arrived = threading.Event()
        self._state_changed = threading.Event()
        self._generating = threading.Event()
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix=f"{config.worker_id}-ahead")
        self._lookahead: Future[list[Prepared] | None] | None = None
        self.control.start()

    @property
    def on_job_done(self) -> Callable[[str], None] | None:
        return self.finisher.on_job_done

    @on_job_done.setter
    def on_job_done(self, callback: Callable[[str], None] | None) -> None:
        self.finisher.on_job_done = callback

    # --- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop claiming new jobs; the jobs in hand are finished (drained)."""
        self._stopping.set()
        self._work_arrived.set()
        self._state_changed.set()

    def wake(self) -> None:
        """A job was just submitted: claim now instead of at the next poll."""
        self._work_arrived.set()

    def cancel_current(self) -> None:
        """Stop the jobs in hand at the next denoising step and give them back to the queue."""
        self.control.stop_all(StopReason.SHUTDOWN)

    def run_forever(self) -> None:
        """Claim and run jobs until ``stop()``; idles ``poll_interval_s`` between empty claims."""
        log.info("worker %s started", self.config.worker_id)
        presence = threading.Thread(
            target=self._presence, name=f"{self.config.worker_id}-presence", daemon=True
        )
        presence.start()
        try:
            while not self._stopping.is_set():
                try:
                    worked = self.run_once()
                except Exception:  # the store is down: back off, the loop must survive
                    log.exception("worker %s: claim failed", self.config.worker_id)
                    worked = False
                    self._stopping.wait(1.0)
                if not worked:
                    self._work_arrived.wait(self.config.poll_interval_s)
                    self._work_arrived.clear()
        finally:
            self.close()
            presence.join()
        log.info("worker %s stopped", self.config.worker_id)

    def close(self) -> None:
        """Give back looked-ahead jobs, wait for results still being stored, stop heartbeats."""
        self._generating.clear()
        self._work_arrived.set()
        for prepared in self._take_lookahead() or []:
            try:
                self.finisher.give_back(prepared.job, "not started (worker stopping)")
            except Exception:  # the store is down: the lease runs out and another worker runs it
                log.warning("job %s: could not give it back", prepared.job.id, exc_info=True)
        self._prefetcher.shutdown(wait=True)
        self.finisher.close()
        self.control.close()

    # --- presence (the registry, for routing and `qwenserve status`) -------------------------
    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.config.worker_id,
            host=self.config.host,
            slugs=tuple(self.config.slugs or ()),
            resident=tuple(self.engine.resident()),
            current_job=self.state.current_job,
            started_at=self.state.started_at,
            last_seen=self.clock(),
            compiles=(
                self.engine.compile_counts() if isinstance(self.engine, CountsCompiles) else {}
            ),
            metrics=metrics_snapshot(self.metrics, self.engine, self.inputs),
        )

    def announce(self) -> None:
        if self.registry is not None:
            self.registry.announce(self.info(), ttl_s=3 * self.config.heartbeat_s)

    def _announce_soon(self) -> None:
        """Busy/idle changed: the presence thread announces it now, off the job's path."""
        self._state_changed.set()

    def _presence(self) -> None:
        while not self._stopping.is_set():
            self._state_changed.clear()
            try:
                self.announce()
            except Exception as error:  # an outage is one line; anything else, its traceback
                outage = isinstance(error, ServiceUnavailable)
                log.warning(
                    "worker %s: announce failed: %s",
                    self.config.worker_id,
                    error,
                    exc_info=not outage,
                )
            self._state_changed.wait(self.config.heartbeat_s)
        if self.registry is not None:
            try:
                self.registry.remove(self.config.worker_id)
            except Exception:
                log.warning("worker %s: could not deregister", self.config.worker_id)

    # --- the loop ---------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim a job (and batch-mates) and run it to its end; False when nothing was runnable.
        A job the look-ahead thread already claimed and prepared comes first."""
        prepared = self._take_lookahead()
        if prepared is None:
            jobs = self.claims.claim_work(look_ahead=False)
            if not jobs:
                return False
            prepared = self._prepare_all(jobs)
        else:
            prepared = self._top_up(prepared)
        self.process_prepared(prepared)
        return True

    def wait_finished(self) -> None:
        """Block until every result handed to the finisher is stored."""
        self.finisher.wait()

    def process_prepared(self, prepared: list[Prepared]) -> None:
        """Run prepared jobs; meanwhile the look-ahead thread (if on) gets the next ones."""
        prepared = self.finisher.end_late(prepared)
        if not prepared:
            return
        steps = prepared[0].request.steps
        runnable = set(j.id for j in self.control.begin([p.job for p in prepared], steps))
        prepared = self.finisher.end_stopped(prepared, runnable)
        if not prepared:
            return
        jobs = [p.job for p in prepared]
        self.state.current_job = jobs[0].id
        self._announce_soon()
        for job in jobs:
            self.metrics.observe(QUEUE_WAIT, job.queue_time_s or 0.0, job.slug)
            log.info(
                "job %s started slug=%s attempt=%d queue_time_s=%.3f batch=%d",
                job.id,
                job.slug,
                job.attempts,
                job.queue_time_s or 0.0,
                len(jobs),
            )
        self._generating.set()
        try:
            self._start_lookahead()
            self._generate(prepared)
        finally:
            self._generating.clear()
            self._work_arrived.set()  # the look-ahead stops waiting for work now
            self.state.current_job = None
            self._announce_soon()

    def _prepare_all(self, jobs: Sequence[Job]) -> list[Prepared]:
        """Decode each job and load its inputs; a job whose inputs fail ends here."""
        return [p for p in (self._prepare(job) for job in jobs) if p is not None]

    def _prepare(self, job: Job) -> Prepared | None:
        try:
            request = job.request
            return Prepared(
                job, request, self.inputs.load_images(request), self.inputs.load_loras(request)
            )
        except QwenServeError as error:
            self.finisher.end(job, error)
        except Exception as error:
            log.exception("job %s: preparing inputs crashed", job.id)
            self.finisher.end(job, InferenceError(describe_crash(error)))
        return None

    def _step_hooks(self, jobs: Sequence[Job]) -> tuple[StepCallback, CancelCheck]:
        """The engine's step callback and cancel check for one pipeline call: progress goes to
        memory (the heartbeat sends it); a stopped job of a batch ends at the step where it is
        seen while its batch-mates go on; the call stops once every job in it is stopped."""
        ids = [job.id for job in jobs]
        timer = StepTimer(self.metrics, jobs[0].slug)

        def on_step(done: int, total: int) -> None:
            timer.step(total)
            self.control.step(ids, done, total)
            if len(ids) > 1:
                for job in self.control.stopped_among(ids):
                    self.finisher.submit_end(job)

        return on_step, lambda: self.control.all_stopped(ids)

    def _generate(self, prepared: list[Prepared]) -> None:
        jobs = [p.job for p in prepared]
        on_step, should_cancel = self._step_hooks(jobs)
        requests = [p.request for p in prepared]
        previews: dict[str, Any] = {}  # only when asked: engines without previews still fit
        if wants_previews(requests):
            previews["on_preview"] = preview_saver(jobs, requests, self.media)
        try:
            outputs: Sequence[GeneratedImage]
            if len(prepared) == 1:
                only = prepared[0]
                outputs = [
                    self.engine.generate(
                        only.request,
                        images=only.images,
                        extra_loras=only.loras,
                        on_step=on_step,
                        should_cancel=should_cancel,
                        **previews,
                    )
                ]
            else:
                outputs = self.engine.generate_batch(
                    requests,
                    images=[p.images for p in prepared],
                    on_step=on_step,
                    should_cancel=should_cancel,
                    **previews,
                )
        except EngineCrashed as crash:  # its process died: as after a lost lease, jobs rerun
            log.error("%s: %s", ", ".join(j.id for j in jobs), crash.message)
            for p in prepared:
                if not self.control.let_lapse(p.job, self.config.max_attempts):
                    self.finisher.end(p.job, crash)  # its last attempt, or it was stopped
            return
        except QwenServeError as error:
            if isinstance(error, OutOfMemory):
                if self._split_after_oom(prepared, error):
                    return
            elif self._one_at_a_time(prepared, error):
                return
            for p in prepared:
                self.finisher.end(p.job, error)
            return
        except Exception as error:  # a bug or a crash in the engine: never the trace to clients
            log.exception("engine crashed on %s", ", ".join(j.id for j in jobs))
            if self._one_at_a_time(prepared, error):
                return
            for p in prepared:
                self.finisher.end(p.job, InferenceError(describe_crash(error)))
            return
        slug = jobs[0].slug
        self.metrics.observe(BATCH, len(prepared), slug)
        for p, output in zip(prepared, outputs, strict=True):
            self.metrics.observe(INFERENCE, output.inference_time_s, slug)
            self.finisher.submit_result(p, output)

    def _split_after_oom(self, prepared: list[Prepared], error: OutOfMemory) -> bool:
        """A batch that ran out of memory runs again as two halves (each may split again, down
        to single requests); False for a single request, which fails alone."""
        if len(prepared) < 2:
            return False
        half = len(prepared) // 2
        log.warning(
            "%s; retrying as batches of %d and %d", error.message, half, len(prepared) - half
        )
        for part in (prepared[:half], prepared[half:]):
            going_on = self.control.going_on([p.job.id for p in part])
            part = self.finisher.end_stopped(part, going_on)
            if part:
                self._generate(part)
        return True

    def _one_at_a_time(self, prepared: list[Prepared], error: Exception) -> bool:
        """A batch whose call raised (not out of memory) runs again one request at a time, so
        only the request that causes it fails and its batch-mates complete; False for a single
        request, which fails alone."""
        if len(prepared) < 2:
            return False
        log.warning("a batch of %d failed (%s); retrying one at a time", len(prepared), error)
        for p in prepared:
            alone = self.finisher.end_stopped([p], self.control.going_on([p.job.id]))
            if alone:
                self._generate(alone)
        return True

    # --- looking ahead ----------------------------------------------------------------------
    def _start_lookahead(self) -> None:
        if self.config.prefetch and self._lookahead is None and not self._stopping.is_set():
            self._lookahead = self._prefetcher.submit(self._look_ahead)

    def _look_ahead(self) -> list[Prepared] | None:
        """While the current batch runs: claim the next job and load its inputs."""
        while self._generating.is_set() and not self._stopping.is_set():
            try:
                jobs = self.claims.claim_work(look_ahead=True)
            except Exception:  # the store hiccupped: the main loop claims after this batch
                log.warning("worker %s: look-ahead claim failed", self.config.worker_id)
                return None
            if jobs:
                return self._prepare_all(jobs)
            self._work_arrived.wait(self.config.poll_interval_s)
            self._work_arrived.clear()
        return None

    def _take_lookahead(self) -> list[Prepared] | None:
        """The looked-ahead jobs (waiting for their inputs if need be), or None."""
        lookahead, self._lookahead = self._lookahead, None
        if lookahead is None:
            return None
        try:
            return lookahead.result()
        except Exception:
            log.exception("worker %s: look-ahead crashed", self.config.worker_id)
            return None

    def _top_up(self, prepared: list[Prepared]) -> list[Prepared]:
        """More batch-mates for looked-ahead jobs: some may have arrived since they were taken."""
        if not prepared:
            return prepared
        jobs = [p.job for p in prepared]
        more = self.claims.with_batch_mates(jobs, 0.0)[len(jobs) :]
        return prepared + self._prepare_all(more)
