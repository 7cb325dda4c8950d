"""Building the pieces from Settings: engines, worker runners, wake-ups (of workers when a job
is queued, of API waiters when a job ends). The backend's parts come from ``open_backend``."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from qwenserve.backends import Backend
from qwenserve.catalog import MODELS, Recipe
from qwenserve.config import Settings
from qwenserve.errors import EngineCrashed, QwenServeError
from qwenserve.notify.endings import Endings
from qwenserve.policy import PolicyConfigError
from qwenserve.policy.classifier import ImageCheck, image_check
from qwenserve.policy.prompt import PromptPolicy, prompt_policy
from qwenserve.worker.config import WorkerConfig
from qwenserve.worker.engine import HostedEngine
from qwenserve.worker.engine_child import EngineSpec
from qwenserve.worker.engine_process import ChildTokenCounter, EngineProcess
from qwenserve.worker.runner import WorkerRunner
from qwenserve.worker.screening import OutputScreen, ScreenedInputLoader

if TYPE_CHECKING:
    from qwenserve.notify import CompletionHub, EventFollower
    from qwenserve.runtime import EngineConfig

log = logging.getLogger("qwenserve")


class Subscriber(Protocol):
    """A started background subscriber (``RedisSignals`` makes them)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class LocalWorker:
    """A runner and its engine, typed: the runner knows the engine only as an ``ImageEngine``;
    the composition root keeps it as a ``HostedEngine`` to warm it up, describe it and, when it
    runs in a child process (``EngineProcess``), stop it."""

    runner: WorkerRunner
    engine: HostedEngine


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
    endings: Endings | None = None,
) -> list[LocalWorker]:
    """``count`` runners, each with its own engine (an engine runs one job at a time), with the
    content policy's image checks when ``settings`` ask for them. They share one endings
    handler (``endings``, else a new one): every ending they make, a claim's give-ups included,
    goes to it at once.

    Raises:
        SystemExit: the content policy's classifier cannot be loaded (saying why).
    """
    from qwenserve.runtime.config import default_max_batch
    from qwenserve.worker.inputs import InputLoader, MediaInputLoader

    inputs = MediaInputLoader.from_settings(settings, backend.media)
    if endings is None:
        endings = Endings(backend.store, backend.media, clock=time.time)
    output_screen, input_check = screens(settings)
    workers = []
    for index in range(count):
        engine, device_type = make_engine(settings)
        config = WorkerConfig.from_settings(
            settings.worker,
            worker_id=f"{socket.gethostname()}-{os.getpid()}-{index}",
            max_batch=settings.worker.max_batch or default_max_batch(device_type),
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
            endings=endings,
        )
        workers.append(LocalWorker(runner, engine))
    return workers


def make_engine(settings: Settings) -> tuple[HostedEngine, str]:
    """One worker's engine and its device type ("cpu", "cuda"): by default in a child process
    (``EngineProcess``: torch is imported there, never here), else (``engine_process`` off) a
    ``runtime.Engine`` in this process.

    Raises:
        SystemExit: the child process could not build its engine (saying why).
    """
    config = engine_config(settings)
    if settings.worker.engine_process:
        from qwenserve.runtime.batch_keys import batch_key

        spec = EngineSpec("qwenserve.runtime:Engine", config, log_level=settings.log_level)
        try:
            child = EngineProcess(spec, batch_key=partial(batch_key, config=config)).start()
        except EngineCrashed as error:
            raise SystemExit(f"qwenserve: {error.message}") from error
        return child, child.device_type
    # Imported here: an API-only node (no workers) never loads torch (7 s of its start).
    from qwenserve.runtime import Engine

    engine = Engine(config)
    return engine, engine.device.type


def stop_engines(workers: Sequence[LocalWorker]) -> None:
    """End the engines' child processes (after the runners drained: a call in flight fails)."""
    for worker in workers:
        if isinstance(worker.engine, EngineProcess):
            worker.engine.close()


def prompt_token_counter(
    settings: Settings, workers: Sequence[LocalWorker]
) -> Callable[[Recipe, str], int | None] | None:
    """Admission's prompt-token counter (``Services.prompt_tokens``), where this process runs
    workers (so it has the weights): asked of an engine's child process, or with the
    pipelines' tokenizers here when the engines run in this process. None with no workers."""
    if not workers:
        return None
    children = [w.engine for w in workers if isinstance(w.engine, EngineProcess)]
    if children:
        return ChildTokenCounter(children)
    from qwenserve.runtime.prompt_tokens import PromptTokenCounter

    return PromptTokenCounter(settings.engine.weights, settings.model_cache_dir)


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
    """A subscriber that wakes ``runners`` when a job they serve is queued (started; ``close()``
    it on shutdown): by this process (``publish_queued``) and, on Redis, by any node. None with
    no runners. Polling (``poll_interval_s``) stays the fallback either way."""
    if not runners:
        return None
    return backend.signals.on_queued(wake_callback(runners, slugs))


def start_done_wakeup(
    backend: Backend, hub: CompletionHub, follower: EventFollower | None = None
) -> Subscriber:
    """A subscriber to job ends (started; ``close()`` it on shutdown): each end published by
    this process's workers or, on Redis, by any node wakes ``hub``'s waiters of that job at once
    and makes ``follower`` read the event log now. After each Redis (re)subscription every
    waiter re-reads the store, since ends may have been missed meanwhile (the follower's read
    finds them too). The follower's polling stays the safety net."""

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
    period). ``follower`` reads the log every ``event_poll_s`` and at once when poked by the
    returned subscriber to the backend's cancel signal: an in-process cancel
    (``publish_cancel_requested``) or, on Redis, one on any node (started; ``close()`` it on
    shutdown; None with no runners)."""
    if not runners:
        return None
    from qwenserve.notify import cancel_requests

    def on_cancel(job_id: str) -> None:
        for runner in runners:
            runner.control.cancel_requested(job_id)

    follower.subscribe(cancel_requests(on_cancel))
    return backend.signals.on_cancel_requested(lambda _job_id: follower.poke())
