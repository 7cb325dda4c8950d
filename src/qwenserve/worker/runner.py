"""The worker loop: claim → lease → inputs → engine → media → complete, or fail with a reason.

A runner owns no state of its own that matters: the job's state lives in the store, and every
transition is one atomic store call that checks this worker still owns the job, so a worker that
was presumed dead (its lease expired and another worker took the job) can never complete it a
second time. The engine is injected (``ImageEngine``); this module never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qwenserve.catalog import MODELS, GenerationRequest
from qwenserve.errors import InferenceError, QwenServeError, error_kind
from qwenserve.jobs import Job, JobResult
from qwenserve.media.encode import encode_image
from qwenserve.media.storage import MediaStore, new_media_id
from qwenserve.store.workers import WorkerInfo, WorkerRegistry
from qwenserve.worker.routing import plan_claims

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

    def resident(self) -> list[str]:
        """Base weights currently loaded (for routing)."""
        ...


class InputLoader(Protocol):
    """Turns a request's image sources and LoRA locations into local, checked inputs."""

    def load_images(self, request: GenerationRequest) -> list[Image.Image]: ...

    def load_loras(self, request: GenerationRequest) -> list[Path]: ...


@dataclass
class WorkerConfig:
    """How a runner claims and holds jobs."""

    worker_id: str
    slugs: Sequence[str] | None = None
    lease_s: float = 60.0
    max_attempts: int = 3
    poll_interval_s: float = 0.05
    drain_timeout_s: float = 30.0
    heartbeat_s: float = 5.0
    host: str = "localhost"
    warm_streak_limit: int = 4
    """After this many warm claims in a row, look at cold models first once (no starvation)."""


@dataclass
class WorkerState:
    """What a runner is doing now, for /metrics and `qwenserve status`."""

    current_job: str | None = None
    jobs_completed: int = 0
    jobs_failed: int = 0
    busy_s: float = 0.0
    started_at: float = 0.0


class _LeaseKeeper:
    """Renews a job's lease in the background; notices when the job was taken away."""

    def __init__(self, store: Store, job_id: str, config: WorkerConfig, clock: Clock) -> None:
        self._store = store
        self._job_id = job_id
        self._config = config
        self._clock = clock
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        period = max(self._config.lease_s / 3.0, 0.05)
        while not self._stop.wait(period):
            try:
                owned = self._store.renew_lease(
                    self._job_id,
                    self._config.worker_id,
                    lease_s=self._config.lease_s,
                    now=self._clock(),
                )
            except Exception:  # a store hiccup: try again next period
                log.warning("lease renewal failed for %s", self._job_id, exc_info=True)
                continue
            if not owned:
                self.lost.set()
                return


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
        self._cancel_current = threading.Event()

    # --- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop claiming new jobs; the job in hand is finished (drained)."""
        self._stopping.set()

    def cancel_current(self) -> None:
        """Abandon the job in hand at the next denoising step and give it back to the queue."""
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
        while not self._stopping.is_set():
            try:
                worked = self.run_once()
            except Exception:  # the store is down: back off, the loop must survive
                log.exception("worker %s: claim failed", self.config.worker_id)
                worked = False
                self._stopping.wait(1.0)
            if not worked:
                self._stopping.wait(self.config.poll_interval_s)
        heartbeat.join()
        log.info("worker %s stopped", self.config.worker_id)

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
        )

    def announce(self) -> None:
        if self.registry is not None:
            self.registry.announce(self.info(), ttl_s=3 * self.config.heartbeat_s)

    def _announce_quietly(self) -> None:
        """Announce a state change now (busy/idle, resident models); the heartbeat retries."""
        try:
            self.announce()
        except Exception:
            log.warning("worker %s: announce failed", self.config.worker_id, exc_info=True)

    def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            self._announce_quietly()
            self._stopping.wait(self.config.heartbeat_s)
        if self.registry is not None:
            try:
                self.registry.remove(self.config.worker_id)
            except Exception:
                log.warning("worker %s: could not deregister", self.config.worker_id)

    def run_once(self) -> bool:
        """Claim at most one job and run it to its end; False when nothing was runnable.

        Models already resident here come first, then models no idle peer holds; every
        ``warm_streak_limit`` warm claims the order flips once so cold models never starve.
        """
        now = self.clock()
        peers = self.registry.alive(now=now) if self.registry is not None else []
        plan = plan_claims(
            served=list(self.config.slugs or MODELS),
            resident=self.engine.resident(),
            peers=peers,
            worker_id=self.config.worker_id,
        )
        order = [(plan.warm, True), (plan.cold, False)]
        if self._warm_streak >= self.config.warm_streak_limit:
            order.reverse()
        for slugs, warm in order:
            if not slugs:
                continue
            jobs = self.store.claim(
                self.config.worker_id,
                slugs=slugs,
                lease_s=self.config.lease_s,
                max_attempts=self.config.max_attempts,
                now=now,
            )
            if jobs:
                self._warm_streak = self._warm_streak + 1 if warm else 0
                for job in jobs:
                    self.process(job)
                return True
        return False

    # --- one job ----------------------------------------------------------------------------
    def process(self, job: Job) -> None:
        """Run one claimed job and record its outcome in the store."""
        self.state.current_job = job.id
        self._cancel_current.clear()
        self._announce_quietly()
        began = time.perf_counter()
        log.info(
            "job %s started slug=%s attempt=%d queue_time_s=%.3f",
            job.id,
            job.slug,
            job.attempts,
            job.queue_time_s or 0.0,
        )
        try:
            with _LeaseKeeper(self.store, job.id, self.config, self.clock) as lease:
                outcome = self._run(job, lease)
        finally:
            self.state.current_job = None
            self.state.busy_s += time.perf_counter() - began
            self._announce_quietly()
        log.info("job %s %s in %.3fs", job.id, outcome, time.perf_counter() - began)
        if self.on_job_done is not None:
            self.on_job_done(job.id)

    def _run(self, job: Job, lease: _LeaseKeeper) -> str:
        config = self.config

        def should_cancel() -> bool:
            return lease.lost.is_set() or self._cancel_current.is_set()

        try:
            request = GenerationRequest.from_dict(job.params)
            images = self.inputs.load_images(request)
            loras = self.inputs.load_loras(request)
            generated = self.engine.generate(
                request, images=images, extra_loras=loras, should_cancel=should_cancel
            )
            data = encode_image(generated.image, request.image_format, request.quality)
        except QwenServeError as error:
            if self._cancel_current.is_set() and not lease.lost.is_set():
                self.store.release(job.id, config.worker_id, now=self.clock())
                return "released (shutdown)"
            if lease.lost.is_set():
                return "abandoned (lease lost)"
            self._fail(job, error_kind(error), error.message)
            return f"failed ({error_kind(error)}: {error.message})"
        except Exception as error:  # a bug or a crash in the engine: never the trace to clients
            log.exception("job %s: engine crashed", job.id)
            message = _describe_crash(error)
            self._fail(job, "InferenceError", message)
            return f"failed ({message})"

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
        if not self.store.complete(job.id, config.worker_id, result, now=self.clock()):
            self.media.delete(media_id)  # someone else owns the job now; keep one result only
            return "discarded (job no longer ours)"
        self.state.jobs_completed += 1
        return f"completed ({generated.width}x{generated.height}, seed {generated.seed})"

    def _fail(self, job: Job, kind: str, message: str) -> None:
        if self.store.fail(
            job.id, self.config.worker_id, kind=kind, message=message, now=self.clock()
        ):
            self.state.jobs_failed += 1


def _describe_crash(error: Exception) -> str:
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return "inference failed: out of memory"
    return InferenceError("inference failed: internal error in the engine").message
