"""What the API handlers share: the store, media, the completion hub, settings, the clock, the
in-memory speed measures behind ETAs, and the process's one reader of the job event log with
its subscribers. The job path itself is ``api/jobs.py``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from qwenserve.api.eta import StepRates, Throughput
from qwenserve.catalog import Recipe
from qwenserve.config import Settings
from qwenserve.media.storage import MediaStore
from qwenserve.notify import CompletionHub, EventFollower
from qwenserve.notify.endings import Endings
from qwenserve.notify.fanout import JobFeeds
from qwenserve.policy.prompt import PromptPolicy, prompt_policy
from qwenserve.store.base import Store
from qwenserve.store.workers import WorkerInfo, WorkerRegistry


@dataclass
class Services:
    """Everything a handler needs, built by the composition root and kept on ``app.state``."""

    settings: Settings
    store: Store
    media: MediaStore
    hub: CompletionHub = field(default_factory=CompletionHub)
    clock: Callable[[], float] = time.time
    registry: WorkerRegistry | None = None
    on_submitted: Callable[[str], None] | None = None
    """Called with each accepted job's id (wakes in-process workers at once)."""
    on_cancel_requested: Callable[[str], None] | None = None
    """Called with the id of a running job whose owner asked to cancel it (the event log's
    reader looks at once, so the worker holding it stops it at its next step)."""
    throughput: Throughput = field(default_factory=Throughput)
    """Recent seconds per finished job of each model (queued jobs' ETA)."""
    step_rates: StepRates = field(default_factory=StepRates)
    """Seconds per denoising step of running jobs, as seen by this node (running jobs' ETA)."""
    prompt_policy: PromptPolicy | None = None
    """Blocked terms checked at submit; read from ``settings`` when not given (None: off).
    Raises PolicyConfigError when the terms file is unusable, so a server fails at start."""
    prompt_tokens: Callable[[Recipe, str], int | None] | None = None
    """Counts a prompt's tokens as a slug's pipeline will (``runtime/prompt_tokens.py``), so a
    prompt past ``Recipe.max_prompt_tokens`` is a 400 at submit; None where this process has no
    tokenizer (the worker's own check refuses it then)."""
    feeds: JobFeeds = field(default_factory=JobFeeds)
    """Each live event stream's queue of its job's logged transitions (``api/stream.py``)."""
    event_reader: InitVar[EventFollower | None] = None
    """The process's one reader of the event log (the composition root shares it with its
    workers' cancel push); made here, not started, when not given."""
    events: EventFollower = field(init=False)
    """The one reader: the hub, the endings, the SSE fan-out, the ETA pace and /metrics are its
    subscribers. Started by the composition root or the app's lifespan; ``catch_up`` reads on
    demand where it is not (in-process tests)."""
    endings: Endings = field(init=False)
    """Everything that follows a job's ending (``notify/endings.py``)."""

    def __post_init__(self, event_reader: EventFollower | None) -> None:
        if self.prompt_policy is None:
            self.prompt_policy = prompt_policy(self.settings)
        self.events = event_reader or EventFollower(self.store, poll_s=self.settings.event_poll_s)
        self.endings = Endings(self.store, self.media, clock=self.clock)
        self.events.subscribe(self.hub.on_event)
        self.events.subscribe(self.endings.on_event)
        self.events.subscribe(self.feeds.on_event)
        self.throughput.follow(self.events)

    def close(self) -> None:
        """Stop the event-log reader and finish the endings handed over."""
        self.events.close()
        self.endings.close()

    def workers(self) -> list[WorkerInfo]:
        """Workers alive anywhere (from their announcements), for /healthz and /metrics."""
        return self.registry.alive(now=self.clock()) if self.registry is not None else []

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a (blocking) store or media call off the event loop."""
        return await run_in_threadpool(fn, *args, **kwargs)

    def base_url(self, request: Request) -> str:
        """Where clients reach us: --public-url behind a proxy, else the address they called."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def own_base_url(self) -> str:
        """Where clients reach us with no request at hand (a webhook body): --public-url, else
        the address this server listens on."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        port = self.settings.port
        return f"http://{self.settings.host}" + ("" if port == 80 else f":{port}")
