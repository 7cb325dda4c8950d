"""Building the pieces from Settings: store, media store, engine, worker runners, wake-ups
(of workers when a job is queued, of API waiters when a job ends)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from qwenserve.catalog import MODELS
from qwenserve.config import Settings
from qwenserve.errors import QwenServeError
from qwenserve.media.storage import LocalMediaStore, MediaStore
from qwenserve.store import open_store
from qwenserve.store.base import Store
from qwenserve.store.workers import WorkerRegistry
from qwenserve.worker.runner import WorkerConfig, WorkerRunner

if TYPE_CHECKING:
    from qwenserve.notify import CompletionHub, EventFollower
    from qwenserve.runtime import EngineConfig
    from qwenserve.store.redis_wakeup import RedisDoneWakeup, RedisWakeup

log = logging.getLogger("qwenserve")


def is_redis(settings: Settings) -> bool:
    return settings.store.startswith(("redis://", "rediss://"))


def build_store(settings: Settings) -> Store:
    return open_store(settings)


def build_media(settings: Settings) -> MediaStore:
    """Local files for the embedded default; Redis (reachable from every node) for scale-out."""
    if is_redis(settings):
        from qwenserve.media.redis_storage import RedisMediaStore

        return RedisMediaStore.from_url(settings.store)
    return LocalMediaStore(settings.media_dir)


def engine_config(settings: Settings, *, resident_models: int | None = None) -> EngineConfig:
    """The engine every command builds from ``settings`` (serve, worker and run alike)."""
    from qwenserve.runtime import EngineConfig

    return EngineConfig(
        weights=settings.weights,
        cache_dir=settings.model_cache_dir,
        device=settings.device,
        dtype=settings.dtype,
        resident_models=resident_models or settings.resident_models,
        resident_memory_gb=settings.resident_memory_gb,
        memory_margin_gb=settings.memory_margin_gb,
        fuse_lightning=settings.fuse_lightning,
        compile=settings.compile,
        quantize=settings.quantize,
        vae_tiling=settings.vae_tiling,
        cpu_offload=settings.cpu_offload,
        step_cache=settings.step_cache,
        prompt_cache_size=settings.prompt_cache_size,
        cfg_batch=settings.cfg_batch,
    )


def check_weights(settings: Settings) -> None:
    """Fail at startup, in seconds, where loading would otherwise hang: ``--weights hub`` on a
    machine that cannot reach the hub. Raises SystemExit with the reason and what to set."""
    if settings.weights != "hub":
        return
    from qwenserve.runtime.hub_access import check_hub_reachable

    try:
        check_hub_reachable()
    except QwenServeError as error:
        raise SystemExit(f"qwenserve: {error.message}") from error


def build_runners(
    settings: Settings,
    store: Store,
    media: MediaStore,
    *,
    count: int,
    slugs: list[str] | None = None,
    on_job_done: Callable[[str], None] | None = None,
    registry: WorkerRegistry | None = None,
) -> list[WorkerRunner]:
    """``count`` runners, each with its own engine (an engine runs one job at a time)."""
    from qwenserve.runtime import Engine
    from qwenserve.runtime.config import default_max_batch
    from qwenserve.worker.inputs import MediaInputLoader

    inputs = MediaInputLoader.from_settings(settings, media)
    runners = []
    for index in range(count):
        engine = Engine(engine_config(settings))
        max_batch = settings.max_batch or default_max_batch(engine.device.type)
        worker_id = f"{socket.gethostname()}-{os.getpid()}-{index}"
        runners.append(
            WorkerRunner(
                store=store,
                media=media,
                engine=engine,
                inputs=inputs.for_worker(),
                config=WorkerConfig(
                    worker_id=worker_id,
                    slugs=slugs,
                    lease_s=settings.lease_s,
                    max_attempts=settings.max_attempts,
                    poll_interval_s=settings.idle_poll_s,
                    host=socket.gethostname(),
                    max_batch=max_batch,
                    batch_window_s=settings.batch_window_s,
                    prefetch=settings.prefetch,
                ),
                on_job_done=on_job_done,
                registry=registry,
            )
        )
    return runners


def warm_up(settings: Settings, runners: list[WorkerRunner], slugs: list[str] | None) -> None:
    """Load (and, with compile on, compile) models before any job: never on a user request.

    ``settings.preload`` names them; with ``compile`` on and no preload, every served slug.
    With batching on, batches of two are compiled too (one graph covers every size above 1).
    """
    targets = list(settings.preload) or (list(slugs or MODELS) if settings.compile else [])
    for runner in runners:
        batch_sizes = (1, 2) if runner.config.max_batch > 1 else (1,)
        if targets:
            try:
                timings = runner.engine.warm_up(  # type: ignore[attr-defined]
                    targets, batch_sizes=batch_sizes
                )
            except QwenServeError as error:
                raise SystemExit(f"qwenserve: warm-up failed: {error.message}") from error
            log.info("warmed up %s", ", ".join(f"{s} {t:.1f}s" for s, t in timings.items()))


def wake_callback(
    runners: Sequence[WorkerRunner], slugs: Collection[str] | None
) -> Callable[[str | None], None]:
    """Wake ``runners`` (which serve ``slugs``, None: all) for a job of ``slug`` (None: any)."""
    served = frozenset(slugs) if slugs else None

    def wake(slug: str | None) -> None:
        if slug is None or served is None or slug in served:
            for runner in runners:
                runner.wake()

    return wake


def start_wakeup(
    settings: Settings, runners: Sequence[WorkerRunner], slugs: Collection[str] | None
) -> RedisWakeup | None:
    """On Redis, a subscriber that wakes ``runners`` when a job they serve is queued by any node
    (started; ``close()`` it on shutdown). None on SQLite (submits there wake in-process) or with
    no runners. Polling (``Settings.idle_poll_s``) stays as the fallback either way."""
    if not runners or not is_redis(settings):
        return None
    from qwenserve.store.redis_wakeup import RedisWakeup

    return RedisWakeup(settings.store, on_wake=wake_callback(runners, slugs)).start()


def start_done_wakeup(
    settings: Settings, hub: CompletionHub, follower: EventFollower | None = None
) -> RedisDoneWakeup | None:
    """On Redis, a subscriber to the done channel (started; ``close()`` it on shutdown): each
    job end published by any node wakes ``hub``'s waiters of that job at once and makes
    ``follower`` read the event log now. After each (re)subscription every waiter re-reads the
    store, since ends may have been missed meanwhile (the follower's read finds them too). None
    on SQLite, where the follower's polling and in-process ``notify`` calls suffice."""
    if not is_redis(settings):
        return None
    from qwenserve.store.redis_wakeup import RedisDoneWakeup

    def on_job_end(job_id: str | None) -> None:
        if job_id is None:
            hub.notify_all()
        else:
            hub.notify(job_id)
        if follower is not None:
            follower.poke()

    return RedisDoneWakeup(settings.store, on_wake=on_job_end).start()
