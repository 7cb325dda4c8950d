"""The worker loop: claim → lease → inputs → engine → media → complete, or fail with a reason.

A runner owns no state of its own that matters: the job's state lives in the store, and every
transition is one atomic store call that checks this worker still owns the job, so a worker that
was presumed dead (its lease expired and another worker took the job) can never complete it a
second time. The engine is injected (``ImageEngine``); this module never imports torch.

Two things keep the engine busy:

- **Batching.** After claiming a job the engine can batch, the runner claims more jobs of the
  same model (up to ``max_batch``, waiting at most ``batch_window_s`` for them) and runs those
  with the same batch key as one pipeline call; the others go straight back to the queue.
- **Overlap.** Encoding the image, storing it and recording the outcome happen on a finisher
  thread while the runner already claims and runs the next job; with ``prefetch`` on, the next
  job is claimed and its inputs fetched and decoded on a look-ahead thread while the current
  batch is still denoising (only for slugs no idle peer serves, so a busy worker never takes
  work an idle one would start at once). Registry announcements go through the heartbeat thread,
  never in the way of a job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from qwenserve.catalog import MODELS, GenerationRequest
from qwenserve.errors import InferenceError, OutOfMemory, QwenServeError, error_kind
from qwenserve.jobs import Job, JobResult
from qwenserve.media.encode import encode_image
from qwenserve.media.inline import stored_media_id
from qwenserve.media.storage import MediaStore, new_media_id
from qwenserve.store.workers import WorkerInfo, WorkerRegistry
from qwenserve.worker.routing import idle_peer_serves, plan_claims

if TYPE_CHECKING:
    from PIL import Image

    from qwenserve.store.base import Store

log = logging.getLogger("qwenserve.worker")

Clock = Callable[[], float]


class GeneratedImageLike(Protocol):
    @property
    def image(self) -> Image.Image: ...
    @property
    def seed(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def inference_time_s(self) -> float: ...


class ImageEngine(Protocol):
    """What the worker needs of the engine (``qwenserve.runtime.Engine`` is one)."""

    def generate(
        self,
        request: GenerationRequest,
        *,
        images: Sequence[Image.Image] = (),
        extra_loras: Sequence[Path] = (),
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GeneratedImageLike: ...

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        """Requests with equal, non-None keys can share one pipeline call."""
        ...

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        images: Sequence[Sequence[Image.Image]] = (),
        should_cancel: Callable[[], bool] | None = None,
    ) -> Sequence[GeneratedImageLike]: ...

    def resident(self) -> list[str]:
        """Base weights currently loaded (for routing)."""
        ...


@runtime_checkable
class CountsCompiles(Protocol):
    """An engine that counts its torch.compile work (``qwenserve.runtime.Engine`` does)."""

    def compile_counts(self) -> dict[str, int]: ...


class InputLoader(Protocol):
    """Turns a request's image sources and LoRA locations into local, checked inputs."""

    def load_images(self, request: GenerationRequest) -> list[Image.Image]: ...

    def load_loras(self, request: GenerationRequest) -> list[Path]: ...


@dataclass
class WorkerConfig:
    """How a runner claims, batches and holds jobs."""

    worker_id: str
    slugs: Sequence[str] | None = None
    lease_s: float = 60.0
    max_attempts: int = 3
    poll_interval_s: float = 0.05
    drain_timeout_s: float = 30.0
    heartbeat_s: float = 5.0
    host: str = "localhost"
    max_batch: int = 4
    """Most requests run in one pipeline call (1 disables batching)."""
    batch_window_s: float = 0.0
    """How long to wait for more same-shape requests before running a partial batch."""
    warm_streak_limit: int = 4
    """After this many warm claims in a row, look at cold models first once (no starvation)."""
    prefetch: bool = False
    """While a batch runs, claim the next job and load its inputs (Settings.prefetch turns it
    on for served workers; off here so a bare runner claims only inside ``run_once``)."""


@dataclass
class WorkerState:
    """What a runner is doing now, for the registry, /metrics and `qwenserve status`."""

    current_job: str | None = None
    jobs_completed: int = 0
    jobs_failed: int = 0
    batches: int = 0
    busy_s: float = 0.0
    started_at: float = 0.0


class _Leases:
    """Renews the leases of every job this runner holds; notes the ones taken away."""

    def __init__(self, store: Store, config: WorkerConfig, clock: Clock) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._held: set[str] = set()
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"{config.worker_id}-leases", daemon=True
        )
        self._thread.start()

    def hold(self, job_id: str) -> None:
        with self._lock:
            self._held.add(job_id)

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._held.discard(job_id)
            self._lost.discard(job_id)

    def lost(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._lost

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        period = max(self._config.lease_s / 3.0, 0.05)
        while not self._stop.wait(period):
            with self._lock:
                held = list(self._held - self._lost)
            for job_id in held:
                try:
                    owned = self._store.renew_lease(
                        job_id,
                        self._config.worker_id,
                        lease_s=self._config.lease_s,
                        now=self._clock(),
                    )
                except Exception:  # a store hiccup: try again next period
                    log.warning("lease renewal failed for %s", job_id, exc_info=True)
                    continue
                if not owned:
                    with self._lock:
                        if job_id in self._held:
                            self._lost.add(job_id)


@dataclass
class _Prepared:
    job: Job
    request: GenerationRequest
    images: list[Image.Image]
    loras: list[Path]


class WorkerRunner:
    """Runs jobs from the store through the engine until stopped."""

    def __init__(
        self,
        *,
        store: Store,
        media: MediaStore,
        engine: ImageEngine,
        inputs: InputLoader,
        config: WorkerConfig,
        clock: Clock = time.time,
        on_job_done: Callable[[str], None] | None = None,
        registry: WorkerRegistry | None = None,
    ) -> None:
        self.store = store
        self.media = media
        self.engine = engine
        self.inputs = inputs
        self.config = config
        self.clock = clock
        self.on_job_done = on_job_done
        self.registry = registry
        self.state = WorkerState(started_at=clock())
        self._warm_streak = 0
        self._stopping = threading.Event()
        self._work_arrived = threading.Event()
        self._cancel_current = threading.Event()
        self._state_changed = threading.Event()
        self._generating = threading.Event()
        self._leases = _Leases(store, config, clock)
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix=f"{config.worker_id}-finish")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix=f"{config.worker_id}-ahead")
        self._lookahead: Future[list[_Prepared] | None] | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop claiming new jobs; the jobs in hand are finished (drained)."""
        self._stopping.set()
        self._work_arrived.set()
        self._state_changed.set()

    def wake(self) -> None:
        """A job was just submitted in this process: claim now instead of at the next poll."""
        self._work_arrived.set()

    def cancel_current(self) -> None:
        """Abandon the jobs in hand at the next denoising step and give them back to the queue."""
        self._cancel_current.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run_forever(self) -> None:
        """Claim and run jobs until ``stop()``; idles ``poll_interval_s`` between empty claims."""
        log.info("worker %s started", self.config.worker_id)
        heartbeat = threading.Thread(
            target=self._heartbeat, name=f"{self.config.worker_id}-heartbeat", daemon=True
        )
        heartbeat.start()
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
            heartbeat.join()
        log.info("worker %s stopped", self.config.worker_id)

    def close(self) -> None:
        """Give back looked-ahead jobs, wait for results still being stored, stop renewing."""
        self._generating.clear()
        self._work_arrived.set()
        for prepared in self._take_lookahead() or []:
            try:
                self._give_back(prepared.job, "not started (worker stopping)")
            except Exception:  # the store is down: the lease runs out and another worker runs it
                log.warning("job %s: could not give it back", prepared.job.id, exc_info=True)
        self._prefetcher.shutdown(wait=True)
        self._finisher.shutdown(wait=True)
        self._leases.close()

    # --- presence and routing ------------------------------------------------------------------
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
        )

    def announce(self) -> None:
        if self.registry is not None:
            self.registry.announce(self.info(), ttl_s=3 * self.config.heartbeat_s)

    def _announce_quietly(self) -> None:
        try:
            self.announce()
        except Exception:
            log.warning("worker %s: announce failed", self.config.worker_id, exc_info=True)

    def _announce_soon(self) -> None:
        """A state change (busy/idle, resident models): the heartbeat thread announces it now,
        off the job's path (a registry write costs a round trip or a disk sync)."""
        self._state_changed.set()

    def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            self._state_changed.clear()
            self._announce_quietly()
            self._state_changed.wait(self.config.heartbeat_s)
        if self.registry is not None:
            try:
                self.registry.remove(self.config.worker_id)
            except Exception:
                log.warning("worker %s: could not deregister", self.config.worker_id)

    # --- claiming ---------------------------------------------------------------------------
    def _claim(self, slugs: Sequence[str], limit: int) -> list[Job]:
        """Claim up to ``limit`` jobs; their leases are renewed from this moment on."""
        jobs = self.store.claim(
            self.config.worker_id,
            slugs=slugs,
            lease_s=self.config.lease_s,
            max_attempts=self.config.max_attempts,
            now=self.clock(),
            limit=limit,
        )
        for job in jobs:
            self._leases.hold(job.id)
        return jobs

    def _give_back(self, job: Job, why: str) -> None:
        """Return a claimed job to the queue, its attempt given back."""
        try:
            self.store.release(job.id, self.config.worker_id, now=self.clock())
            log.info("job %s released (%s)", job.id, why)
        finally:
            self._leases.drop(job.id)

    def run_once(self) -> bool:
        """Claim a job (and batch-mates) and run it to its end; False when nothing was runnable.

        Models already resident here come first, then models no idle peer holds; every
        ``warm_streak_limit`` warm claims the order flips once so cold models never starve.
        A job the look-ahead thread already claimed and prepared comes before any of these.
        """
        prepared = self._take_lookahead()
        if prepared is None:
            jobs = self._claim_work(look_ahead=False)
            if not jobs:
                return False
            prepared = self._prepare_all(jobs)
        else:
            prepared = self._top_up(prepared)
        self.process_prepared(prepared)
        return True

    def _claim_work(self, *, look_ahead: bool) -> list[Job]:
        """One job by the routing plan, with its batch-mates; [] when nothing is claimable."""
        peers = self.registry.alive(now=self.clock()) if self.registry is not None else []
        plan = plan_claims(
            served=list(self.config.slugs or MODELS),
            resident=self.engine.resident(),
            peers=peers,
            worker_id=self.config.worker_id,
        )
        order = [(plan.warm, True), (plan.cold, False)]
        if self._warm_streak >= self.config.warm_streak_limit:
            order.reverse()
        me = self.config.worker_id
        for slugs, warm in order:
            if look_ahead:  # leave to idle peers what they would start at once
                slugs = tuple(s for s in slugs if not idle_peer_serves(s, peers, me))
            if not slugs:
                continue
            jobs = self._claim(slugs, 1)
            if jobs:
                self._warm_streak = self._warm_streak + 1 if warm else 0
                return self._with_batch_mates(jobs, self.config.batch_window_s)
        return []

    def _with_batch_mates(self, batch: list[Job], window_s: float) -> list[Job]:
        """``batch`` plus queued jobs that can share its pipeline call; others go back."""
        if self.config.max_batch <= 1 or len(batch) >= self.config.max_batch:
            return batch
        first = batch[0]
        key = self._batch_key(first)
        if key is None:
            return batch
        batch = list(batch)
        deadline = time.monotonic() + window_s
        while len(batch) < self.config.max_batch:
            more = self._claim([first.slug], self.config.max_batch - len(batch))
            mates = []
            for job in more:
                if self._batch_key(job) == key:
                    mates.append(job)
                else:  # not a batch-mate: straight back, its attempt given back
                    self._give_back(job, "not a batch-mate")
            batch.extend(mates)
            remaining_s = deadline - time.monotonic()
            if more and not mates:
                break  # what waits next in line cannot join: do not churn it
            if len(batch) >= self.config.max_batch or remaining_s <= 0:
                break
            if not more:
                time.sleep(min(0.005, remaining_s))
        return batch

    def _batch_key(self, job: Job) -> Hashable | None:
        try:
            return self.engine.batch_key(GenerationRequest.from_dict(job.params))
        except Exception:
            return None

    # --- looking ahead ----------------------------------------------------------------------
    def _start_lookahead(self) -> None:
        if self.config.prefetch and self._lookahead is None and not self._stopping.is_set():
            self._lookahead = self._prefetcher.submit(self._look_ahead)

    def _look_ahead(self) -> list[_Prepared] | None:
        """While the current batch runs: claim the next job and load its inputs."""
        while self._generating.is_set() and not self._stopping.is_set():
            try:
                jobs = self._claim_work(look_ahead=True)
            except Exception:  # the store hiccupped: the main loop claims after this batch
                log.warning("worker %s: look-ahead claim failed", self.config.worker_id)
                return None
            if jobs:
                return self._prepare_all(jobs)
            self._work_arrived.wait(self.config.poll_interval_s)
            self._work_arrived.clear()
        return None

    def _take_lookahead(self) -> list[_Prepared] | None:
        """The looked-ahead jobs (waiting for their inputs if need be), or None."""
        lookahead, self._lookahead = self._lookahead, None
        if lookahead is None:
            return None
        try:
            return lookahead.result()
        except Exception:
            log.exception("worker %s: look-ahead crashed", self.config.worker_id)
            return None

    def _top_up(self, prepared: list[_Prepared]) -> list[_Prepared]:
        """More batch-mates for looked-ahead jobs: some may have arrived since they were taken."""
        if not prepared:
            return prepared
        jobs = [p.job for p in prepared]
        more = self._with_batch_mates(jobs, 0.0)[len(jobs) :]
        return prepared + self._prepare_all(more)

    # --- running ----------------------------------------------------------------------------
    def wait_finished(self) -> None:
        """Block until every result handed to the finisher is stored."""
        self._finisher.submit(lambda: None).result()

    def _prepare_all(self, jobs: Sequence[Job]) -> list[_Prepared]:
        """Decode each job and load its inputs; a job whose inputs fail ends here."""
        return [p for p in (self._prepare(job) for job in jobs) if p is not None]

    def process_prepared(self, prepared: list[_Prepared]) -> None:
        """Run prepared jobs; meanwhile the look-ahead thread (if on) gets the next ones."""
        if not prepared:
            return
        self._cancel_current.clear()
        jobs = [p.job for p in prepared]
        self.state.current_job = jobs[0].id
        self._announce_soon()
        began = time.perf_counter()
        for job in jobs:
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
            self.state.busy_s += time.perf_counter() - began
            self._announce_soon()

    def _should_cancel_for(self, jobs: Sequence[Job]) -> Callable[[], bool]:
        def should_cancel() -> bool:
            return self._cancel_current.is_set() or all(self._leases.lost(j.id) for j in jobs)

        return should_cancel

    def _prepare(self, job: Job) -> _Prepared | None:
        """Decode the request and fetch its inputs; a job whose inputs fail ends here."""
        try:
            request = GenerationRequest.from_dict(job.params)
            return _Prepared(
                job, request, self.inputs.load_images(request), self.inputs.load_loras(request)
            )
        except QwenServeError as error:
            self._end_with_error(job, error)
        except Exception as error:
            log.exception("job %s: preparing inputs crashed", job.id)
            self._end_with_error(job, InferenceError(_describe_crash(error)))
        return None

    def _generate(self, prepared: list[_Prepared]) -> None:
        jobs = [p.job for p in prepared]
        should_cancel = self._should_cancel_for(jobs)
        try:
            if len(prepared) == 1:
                only = prepared[0]
                outputs: Sequence[GeneratedImageLike] = [
                    self.engine.generate(
                        only.request,
                        images=only.images,
                        extra_loras=only.loras,
                        should_cancel=should_cancel,
                    )
                ]
            else:
                outputs = self.engine.generate_batch(
                    [p.request for p in prepared],
                    images=[p.images for p in prepared],
                    should_cancel=should_cancel,
                )
                self.state.batches += 1
        except QwenServeError as error:
            if isinstance(error, OutOfMemory) and self._split_after_oom(prepared, error):
                return
            for p in prepared:
                self._end_with_error(p.job, error)
            return
        except Exception as error:  # a bug or a crash in the engine: never the trace to clients
            log.exception("engine crashed on %s", ", ".join(j.id for j in jobs))
            for p in prepared:
                self._end_with_error(p.job, InferenceError(_describe_crash(error)))
            return
        for p, output in zip(prepared, outputs, strict=True):
            self._finisher.submit(self._finish, p, output)

    def _split_after_oom(self, prepared: list[_Prepared], error: OutOfMemory) -> bool:
        """A batch that ran out of memory runs again as two halves (each may split again, down
        to single requests); False for a single request, which fails alone."""
        if len(prepared) < 2:
            return False
        half = len(prepared) // 2
        log.warning(
            "%s; retrying as batches of %d and %d", error.message, half, len(prepared) - half
        )
        self._generate(prepared[:half])
        self._generate(prepared[half:])
        return True

    def _finish(self, prepared: _Prepared, generated: GeneratedImageLike) -> None:
        """Encode, store and complete (on the finisher thread, overlapping the next job)."""
        job, request = prepared.job, prepared.request
        try:
            data = encode_image(generated.image, request.image_format, request.quality)
            media_id = new_media_id()
            self.media.put(media_id, data, request.content_type, expires_at=job.expires_at)
            result = JobResult(
                media_id=media_id,
                content_type=request.content_type,
                width=generated.width,
                height=generated.height,
                seed=generated.seed,
                inference_time_s=generated.inference_time_s,
                size_bytes=len(data),
            )
            if self.store.complete(job.id, self.config.worker_id, result, now=self.clock()):
                self.state.jobs_completed += 1
                self._forget_inputs(job)
                outcome = f"completed ({generated.width}x{generated.height}, seed {generated.seed})"
            else:
                self.media.delete(media_id)  # someone else owns the job now; keep one result
                outcome = "discarded (job no longer ours)"
            log.info("job %s %s", job.id, outcome)
        except Exception as error:
            log.exception("job %s: storing the result failed", job.id)
            self._end_with_error(job, InferenceError(_describe_crash(error)))
            return
        finally:
            self._leases.drop(job.id)
        self._notify(job.id)

    def _end_with_error(self, job: Job, error: QwenServeError) -> None:
        """Fail the job, or give it back when we are cancelling for shutdown."""
        try:
            if self._cancel_current.is_set() and not self._leases.lost(job.id):
                self.store.release(job.id, self.config.worker_id, now=self.clock())
                log.info("job %s released (shutdown)", job.id)
            elif self._leases.lost(job.id):
                log.info("job %s abandoned (lease lost)", job.id)
            elif self.store.fail(
                job.id,
                self.config.worker_id,
                kind=error_kind(error),
                message=error.message,
                now=self.clock(),
            ):
                self.state.jobs_failed += 1
                self._forget_inputs(job)
                log.info("job %s failed (%s: %s)", job.id, error_kind(error), error.message)
        finally:
            self._leases.drop(job.id)
        self._notify(job.id)

    def _forget_inputs(self, job: Job) -> None:
        """Delete the inline inputs the API stored for ``job`` (media/inline.py) once it has
        ended for good; expiry would take them an hour later. Never fails the job."""
        try:
            for image in job.params.get("images", ()):
                media_id = stored_media_id(str(image.get("source", "")))
                if media_id is not None:
                    self.media.delete(media_id)
        except Exception:
            log.warning("job %s: could not delete its stored inputs", job.id, exc_info=True)

    def _notify(self, job_id: str) -> None:
        if self.on_job_done is not None:
            self.on_job_done(job_id)


def _describe_crash(error: Exception) -> str:
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return "inference failed: out of memory"
    return "inference failed: internal error in the engine"
