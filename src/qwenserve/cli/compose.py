"""Building the pieces from Settings: engines, worker runners, wake-ups (of workers when a job
is queued, of API waiters when a job ends). The backend's parts come from ``open_backend``."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from qwenserve.backends import Backend
from qwenserve.catalog import MODELS
from qwenserve.config import Settings
from qwenserve.errors import QwenServeError
from qwenserve.policy import PolicyConfigError
from qwenserve.policy.classifier import ImageCheck, image_check
from qwenserve.policy.prompt import PromptPolicy, prompt_policy
from qwenserve.worker.runner import WorkerConfig, WorkerRunner
from qwenserve.worker.screening import OutputScreen, ScreenedInputLoader

if TYPE_CHECKING:
    from qwenserve.notify import CompletionHub, EventFollower
    from qwenserve.runtime import Engine, EngineConfig

log = logging.getLogger("qwenserve")


class Subscriber(Protocol):
    """A started background subscriber (``RedisSignals`` makes them)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class LocalWorker:
    """A runner and its engine, typed: the runner knows the engine only as an ``ImageEngine``;
    the composition root keeps the ``Engine`` to warm it up and describe it."""

    runner: WorkerRunner
    engine: Engine


def engine_config(settings: Settings, *, resident_models: int | None = None) -> EngineConfig:
    """The engine every command builds from ``settings`` (serve, worker and run alike)."""
    from dataclasses import replace

    from qwenserve.runtime import EngineConfig

    config = EngineConfig.from_settings(settings.engine, cache_dir=settings.model_cache_dir)
    return replace(config, resident_models=resident_models) if resident_models else config


def check_weights(settings: Settings) -> None:
    """Fail at startup, in seconds, where loading would otherwise hang: ``--weights hub`` on a
    machine that cannot reach the hub. Raises SystemExit with the reason and what to set."""
    if settings.engine.weights != "hub":
        return
    from qwenserve.runtime.hub_access import check_hub_reachable

    try:
        check_hub_reachable()
    except QwenServeError as error:
        raise SystemExit(f"qwenserve: {error.message}") from error


def build_workers(
    settings: Settings,
    backend: Backend,
    *,
    count: int,
    slugs: list[str] | None = None,
    on_job_done: Callable[[str], None] | None = None,
) -> list[LocalWorker]:
    """``count`` runners, each with its own engine (an engine runs one job at a time), with the
    content policy's image checks when ``settings`` ask for them.

    Raises:
        SystemExit: the content policy's classifier cannot be loaded (saying why).
    """
    from qwenserve.runtime.config import default_max_batch
    from qwenserve.worker.inputs import InputLoader, MediaInputLoader

    inputs = MediaInputLoader.from_settings(settings, backend.media)
    output_screen, input_check = screens(settings)
    workers = []
    for index in range(count):
        # Imported here: an API-only node (count 0) never loads torch (7 s of its start).
        from qwenserve.runtime import Engine

        engine = Engine(engine_config(settings))
        config = WorkerConfig.from_settings(
            settings.worker,
            worker_id=f"{socket.gethostname()}-{os.getpid()}-{index}",
            max_batch=settings.worker.max_batch or default_max_batch(engine.device.type),
            slugs=slugs,
            host=socket.gethostname(),
        )
        loader: InputLoader = inputs.for_worker()
        if input_check is not None:
            loader = ScreenedInputLoader(loader, input_check)
        runner = WorkerRunner(
            store=backend.store,
            media=backend.media,
            engine=engine,
            inputs=loader,
            output_screen=output_screen,
            config=config,
            on_job_done=on_job_done,
            registry=backend.registry,
        )
        workers.append(LocalWorker(runner, engine))
    return workers


def screens(settings: Settings) -> tuple[OutputScreen | None, ImageCheck | None]:
    """The content policy's output screen and input check (None: not asked for).

    Raises:
        SystemExit: the classifier cannot be loaded (not installed, a bad name), saying why.
    """
    try:
        output_check = image_check(settings, inputs=False)
        input_check = image_check(settings, inputs=True)
    except PolicyConfigError as error:
        raise SystemExit(f"qwenserve: content policy: {error}") from error
    output_screen = None
    if output_check is not None:
        output_screen = OutputScreen(output_check, charge=settings.charge_blocked_outputs)
    return output_screen, input_check


def load_prompt_policy(settings: Settings) -> PromptPolicy | None:
    """The content policy's blocked terms, read at startup (None: off).

    Raises:
        SystemExit: the terms file cannot be read or has an invalid expression (naming the line).
    """
    try:
        return prompt_policy(settings)
    except PolicyConfigError as error:
        raise SystemExit(f"qwenserve: content policy: {error}") from error


def warm_up(settings: Settings, workers: Sequence[LocalWorker], slugs: list[str] | None) -> None:
    """Load (and, with compile on, compile) models before any job: never on a user request.

    ``preload`` names them; with ``compile`` on and no preload, every served slug.
    With batching on, batches of two are compiled too (one graph covers every size above 1).
    """
    preload, compile_on = settings.worker.preload, settings.engine.compile
    targets = list(preload) or (list(slugs or MODELS) if compile_on else [])
    for worker in workers:
        batch_sizes = (1, 2) if worker.runner.config.max_batch > 1 else (1,)
        if targets:
            try:
                timings = worker.engine.warm_up(targets, batch_sizes=batch_sizes)
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
    backend: Backend, runners: Sequence[WorkerRunner], slugs: Collection[str] | None
) -> Subscriber | None:
    """Where workers in other processes share the store, a subscriber that wakes ``runners``
    when a job they serve is queued by any node (started; ``close()`` it on shutdown). None with
    no signals (submits wake in-process) or no runners. Polling (``poll_interval_s``) stays
    the fallback either way."""
    if not runners or backend.signals is None:
        return None
    return backend.signals.on_queued(wake_callback(runners, slugs))


def start_done_wakeup(
    backend: Backend, hub: CompletionHub, follower: EventFollower | None = None
) -> Subscriber | None:
    """Where other processes end jobs, a subscriber to job ends (started; ``close()`` it on
    shutdown): each end published by any node wakes ``hub``'s waiters of that job at once and
    makes ``follower`` read the event log now. After each (re)subscription every waiter
    re-reads the store, since ends may have been missed meanwhile (the follower's read finds
    them too). None with no signals (SQLite), where the follower's polling and in-process
    ``notify`` calls suffice."""
    if backend.signals is None:
        return None

    def on_job_end(job_id: str | None) -> None:
        if job_id is None:
            hub.notify_all()
        else:
            hub.notify(job_id)
        if follower is not None:
            follower.poke()

    return backend.signals.on_job_end(on_job_end)


def push_cancels(
    backend: Backend, follower: EventFollower, runners: Sequence[WorkerRunner]
) -> Subscriber | None:
    """Hand every cancel request in the event log to ``runners`` (the one holding the job
    heartbeats at once and stops it at its next denoising step, without waiting for its
    period). ``follower`` reads the log every ``event_poll_s`` and at once when poked: by an
    in-process cancel (``Services.on_cancel_requested``) and, where other processes share the
    store, by the returned subscriber to Redis's cancel channel (started; ``close()`` it on
    shutdown; None with no signals or no runners)."""
    if not runners:
        return None
    from qwenserve.notify import cancel_requests

    def on_cancel(job_id: str) -> None:
        for runner in runners:
            runner.control.cancel_requested(job_id)

    follower.subscribe(cancel_requests(on_cancel))
    if backend.signals is None:
        return None
    return backend.signals.on_cancel_requested(lambda _job_id: follower.poke())
