"""The engine in its own process, seen from the worker as an ordinary ``ImageEngine``.

``qwenserve serve`` and ``qwenserve worker`` keep the API and the worker's control loop
(claims, heartbeat, leases, finisher) in the parent; each worker's engine (torch, diffusers,
CUDA: ``qwenserve.runtime``) runs in a child started with ``spawn`` (``engine_child.py``), which
this proxy talks to in typed messages (``engine_messages.py``). The runner, claims and finisher
do not know the difference: ``generate`` blocks until the child answers, the step callback and
the stop check run here as the child reports each step (a stop becomes a ``Cancel``, seen by the
child at its next step), previews arrive before their job's result.

What the parent needs between calls comes without a round trip or without torch: the batch key
is computed here (``runtime/batch_keys.py``, pure), resident models and counters come with every
answer (``Stats``), prompt-token counts (admission) are asked of the child.

When the child dies (SIGKILL, a segfault in a kernel, the OOM killer) the calls in flight raise
``EngineCrashed`` (the runner gives their jobs back like a lost lease, ``worker/control.py``) and
a new child starts at once (later and later while children keep dying before they are ready),
replaying the warm-up so models load before the next job, not on it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenserve.catalog import GenerationRequest, Recipe
from qwenserve.errors import EngineCrashed
from qwenserve.runtime.config import GeneratedImage
from qwenserve.worker.engine import CancelCheck, PreviewCallback, StepCallback
from qwenserve.worker.engine_child import EngineSpec
from qwenserve.worker.engine_link import Link, Pending
from qwenserve.worker.engine_messages import (
    CountTokens,
    Generate,
    Result,
    Stats,
    ToChild,
    TokenCount,
    WarmedUp,
    WarmUp,
    put_image,
    take_image,
)

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("qwenserve.worker")

BatchKey = Callable[[GenerationRequest], Hashable | None]
CANCEL_POLL_S = 0.02
"""How often a waiting call re-reads its stop check between the child's step reports."""
MAX_RESTART_DELAY_S = 30.0


class EngineProcess:
    """An ``ImageEngine`` whose engine runs in a child process (see the module docstring).

    Args:
        spec: how the child builds its engine.
        batch_key: the engine's batch key, computed here (``batch_keys.batch_key`` with the
            engine's config for the real engine).
        start_timeout_s: how long a call waits for a (re)starting child before it fails.
    """

    def __init__(
        self, spec: EngineSpec, *, batch_key: BatchKey, start_timeout_s: float = 600.0
    ) -> None:
        self.spec = spec
        self._batch_key = batch_key
        self.start_timeout_s = start_timeout_s
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self._link: Link | None = None
        self._closed = False
        self._stats = Stats()
        self._counted: dict[str, Stats] = {}
        """Counters of children that died, added to the live one's (they never go back)."""
        self._warm: tuple[tuple[str, ...], tuple[int, ...]] | None = None
        self._quick_deaths = 0
        self.crashes = 0
        """Children that died while this proxy wanted them alive."""

    # --- life -------------------------------------------------------------------------------
    def start(self) -> EngineProcess:
        """Start the child and wait until its engine is built.

        Raises:
            EngineCrashed: the child died before it was ready (saying how, and why if it said).
        """
        with self._changed:
            self._link = self._new_link()
            link = self._link
        deadline = time.monotonic() + self.start_timeout_s
        while not link.ready.wait(0.1):
            if link.dead.is_set() or time.monotonic() > deadline:
                self.close()
                raise EngineCrashed(f"the engine process could not start ({link.death})")
        return self

    def close(self) -> None:
        """End the child (jobs should be drained first: a call in flight fails)."""
        with self._changed:
            self._closed = True
            link, self._link = self._link, None
            self._changed.notify_all()
        if link is not None:
            link.close()

    @property
    def pid(self) -> int | None:
        """The live child's process id (None while none is)."""
        link = self._link
        return link.pid if link is not None and not link.dead.is_set() else None

    @property
    def device_type(self) -> str:
        link = self._link
        return link.info.device_type if link is not None and link.info is not None else "cpu"

    def describe(self) -> str:
        link = self._link
        what = link.info.description if link is not None and link.info is not None else "?"
        return f"{what}; in its own process"

    def _new_link(self) -> Link:
        return Link(self.spec, on_ready=self._ready, on_stats=self._take_stats, on_death=self._died)

    def _ready(self, link: Link) -> None:
        if self._warm is not None and self.crashes:  # a restart: load what was warm
            slugs, sizes = self._warm
            link.send(WarmUp(next(self._ids), slugs, sizes))
        with self._changed:
            self._changed.notify_all()

    def _died(self, link: Link) -> None:
        with self._changed:
            if self._closed or link.closing or self._link is not link:
                return
            self._link = None
            self.crashes += 1
            self._quick_deaths = self._quick_deaths + 1 if link.info is None else 0
            stats, self._stats = self._stats, Stats()
            self._counted[str(link.pid)] = stats
            self._changed.notify_all()
        log.error("engine process %s died (%s); starting a new one", link.pid, link.death)
        delay = min(MAX_RESTART_DELAY_S, 0.5 * 2**self._quick_deaths) if self._quick_deaths else 0
        threading.Thread(target=self._restart, args=(delay,), daemon=True).start()

    def _restart(self, delay_s: float) -> None:
        while True:
            time.sleep(delay_s)
            with self._changed:
                if self._closed or self._link is not None:
                    return
                try:
                    self._link = self._new_link()
                    return
                except Exception:  # no process could be started now (out of pids, memory)
                    log.exception("could not start an engine process; trying again")
            delay_s = min(MAX_RESTART_DELAY_S, max(1.0, 2 * delay_s))

    def _live_link(self) -> Link:
        """The ready child, waiting for one that (re)starts.

        Raises:
            EngineCrashed: closed, or no child became ready within ``start_timeout_s``.
        """
        deadline = time.monotonic() + self.start_timeout_s
        with self._changed:
            while True:
                if self._closed:
                    raise EngineCrashed("the engine process was stopped")
                link = self._link
                if link is not None and link.ready.is_set() and not link.dead.is_set():
                    return link
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineCrashed(f"no engine process came up in {self.start_timeout_s:.0f}s")
                self._changed.wait(min(remaining, 1.0))

    # --- ImageEngine --------------------------------------------------------------------------
    def generate(
        self,
        request: GenerationRequest,
        *,
        images: Sequence[Image.Image] = (),
        extra_loras: Sequence[Path] = (),
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> GeneratedImage:
        return self._call(
            [request], [images], extra_loras, False, on_step, should_cancel, on_preview
        )[0]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        images: Sequence[Sequence[Image.Image]] = (),
        should_cancel: CancelCheck | None = None,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        if not requests:
            return []
        per_request = list(images) if images else [() for _ in requests]
        return self._call(requests, per_request, (), True, on_step, should_cancel, on_preview)

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        return self._batch_key(request)

    def resident(self) -> list[str]:
        return list(self._stats.resident)

    def compile_counts(self) -> dict[str, int]:
        total = dict(self._stats.compile_counts)
        for old in self._counted.values():
            for kind, n in old.compile_counts.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def pipeline_counts(self) -> dict[str, dict[str, int]]:
        total = {kind: dict(counts) for kind, counts in self._stats.pipeline_counts.items()}
        for old in self._counted.values():
            for kind, counts in old.pipeline_counts.items():
                into = total.setdefault(kind, {})
                for key, n in counts.items():
                    into[key] = into.get(key, 0) + n
        return total

    def device_memory(self) -> dict[str, int]:
        return dict(self._stats.device_memory)

    def _take_stats(self, stats: Stats) -> None:
        self._stats = stats

    def _call(
        self,
        requests: Sequence[GenerationRequest],
        images: Sequence[Sequence[Image.Image]],
        extra_loras: Sequence[Path],
        batch: bool,
        on_step: StepCallback | None,
        should_cancel: CancelCheck | None,
        on_preview: PreviewCallback | None,
    ) -> list[GeneratedImage]:
        link = self._live_link()
        call_id = next(self._ids)
        message = Generate(
            call_id,
            tuple(requests),
            tuple(tuple(put_image(link.folder, image) for image in per) for per in images),
            tuple(str(path) for path in extra_loras),
            batch=batch,
            previews=on_preview is not None,
        )
        pending = Pending(on_step, should_cancel, on_preview)
        answer = self._wait(link, call_id, pending, message)
        assert isinstance(answer, Result)
        return [
            GeneratedImage(
                image=take_image(out.image),
                seed=out.seed,
                width=out.width,
                height=out.height,
                inference_time_s=out.inference_time_s,
            )
            for out in answer.outputs
        ]

    def _wait(self, link: Link, call_id: int, pending: Pending, message: ToChild) -> Any:
        """Send ``message`` and wait for its answer; between the child's step reports the
        stop check is re-read, so a stop reaches the child within about ``CANCEL_POLL_S``."""
        link.call(call_id, pending, message)
        poll = CANCEL_POLL_S if pending.should_cancel is not None else None
        while not pending.done.wait(poll):
            link.check_cancel(call_id, pending)
        if pending.error is not None:
            raise pending.error
        return pending.answer

    # --- beyond ImageEngine: warm-up and admission's token counts ----------------------------
    def warm_up(
        self, slugs: Sequence[str], *, batch_sizes: Sequence[int] = (1,)
    ) -> dict[str, float]:
        """Load (and with compile on, compile) ``slugs`` in the child; replayed in every new
        child after a crash. Returns seconds per slug."""
        self._warm = (tuple(slugs), tuple(batch_sizes))
        link = self._live_link()
        call_id = next(self._ids)
        answer = self._wait(link, call_id, Pending(), WarmUp(call_id, *self._warm))
        assert isinstance(answer, WarmedUp)
        return answer.timings

    def count_tokens(self, recipe: Recipe, text: str, timeout_s: float = 60.0) -> int | None:
        """``text``'s tokens under ``recipe``'s pipeline tokenizer, counted in the child; None
        when no child is ready now or it does not answer in time (the worker's own check then
        decides, as when a tokenizer cannot be loaded)."""
        link = self._link
        if link is None or not link.ready.is_set() or link.dead.is_set():
            return None
        call_id = next(self._ids)
        pending = Pending()
        try:
            link.call(call_id, pending, CountTokens(call_id, recipe, text))
        except EngineCrashed:
            return None
        if not pending.done.wait(timeout_s) or pending.error is not None:
            link.forget(call_id)
            return None
        answer = pending.answer
        return answer.count if isinstance(answer, TokenCount) else None


class ChildTokenCounter:
    """Admission's prompt-token counter (``Services.prompt_tokens``) for engines in child
    processes: the first one that is up counts."""

    def __init__(self, engines: Sequence[EngineProcess]) -> None:
        self.engines = list(engines)

    def __call__(self, recipe: Recipe, text: str) -> int | None:
        for engine in self.engines:
            if engine.pid is not None:
                return engine.count_tokens(recipe, text)
        return None
