"""The engine's own process: builds the engine (torch, diffusers, CUDA are imported here and
nowhere in its parent) and serves the parent's messages (``engine_messages.py``) until its
pipe closes.

Three threads: the reader takes every message as it comes, so a ``Cancel`` is seen while a
call runs (the call's step callback reads it at the next step) and a token count never waits
behind a denoise; calls and warm-ups run one at a time on the main thread, in order; token
counts on their own thread. The parent owns this process's life: SIGINT and SIGTERM are
ignored (a Ctrl-C or a drain reaches the parent, which stops the jobs at a step and then closes
the pipe), and a closed pipe (the parent exited or was killed) ends it at once.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from qwenserve.errors import InvalidRequest, QwenServeError
from qwenserve.worker.engine import CountsCompiles, CountsPipelines, ReportsDeviceMemory
from qwenserve.worker.engine_messages import (
    Cancel,
    CountTokens,
    Failed,
    Generate,
    Output,
    Preview,
    Ready,
    Result,
    Stats,
    Step,
    TokenCount,
    ToParent,
    WarmedUp,
    WarmUp,
    put_image,
    take_image,
)

log = logging.getLogger("qwenserve.engine.child")


@dataclass(frozen=True)
class EngineSpec:
    """How the child builds its engine: ``factory`` ("module:callable") called with
    ``config``. The real one is ``qwenserve.runtime:Engine`` with an ``EngineConfig``; tests
    name fixture engines that fail in a given way."""

    factory: str
    config: Any
    log_level: str = "INFO"
    count_tokens: bool = True
    """Build a ``PromptTokenCounter`` from ``config`` (weights, cache_dir) for admission."""


def main(conn: Connection, spec: EngineSpec, folder: str) -> None:
    """The child's entry point (``multiprocessing``'s spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=spec.log_level.upper(), handlers=[handler], force=True)
    child = _Child(conn, Path(folder))
    try:
        module, _, name = spec.factory.partition(":")
        engine = getattr(importlib.import_module(module), name)(spec.config)
        device = getattr(engine, "device", None)
        describe = getattr(engine, "describe", None)
        ready = Ready(
            pid=os.getpid(),
            description=describe() if callable(describe) else spec.factory,
            device_type=getattr(device, "type", "cpu"),
        )
    except Exception as error:  # told to the parent, which says why it could not start
        log.exception("the engine could not be built")
        child.send(_failure(0, error))
        return
    child.serve(engine, spec, ready)


class _Child:
    def __init__(self, conn: Connection, folder: Path) -> None:
        self.conn = conn
        self.folder = folder
        self._send_lock = threading.Lock()
        self._cancelled: set[int] = set()
        self._cancel_lock = threading.Lock()
        self._work: queue.Queue[Generate | WarmUp] = queue.Queue()
        self._counts: queue.Queue[CountTokens] = queue.Queue()

    def send(self, message: ToParent) -> None:
        with self._send_lock:
            self.conn.send(message)

    def serve(self, engine: Any, spec: EngineSpec, ready: Ready) -> None:
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()
        threading.Thread(
            target=self._count_tokens, args=(spec,), name="engine-tokens", daemon=True
        ).start()
        self.send(_stats(engine))
        self.send(ready)
        # The description is the parent's startup line (once, however many workers): here the pid.
        log.info("engine process %d ready", ready.pid)
        while True:
            message = self._work.get()
            if isinstance(message, Generate):
                self._generate(engine, message)
            else:
                self._warm_up(engine, message)

    def _read(self) -> None:
        """Every message as it comes; the pipe closing means the parent is gone: exit now."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)
            if isinstance(message, Cancel):
                with self._cancel_lock:
                    self._cancelled.add(message.call_id)
            elif isinstance(message, CountTokens):
                self._counts.put(message)
            else:
                self._work.put(message)

    def _stopped(self, call_id: int) -> bool:
        with self._cancel_lock:
            return call_id in self._cancelled

    def _generate(self, engine: Any, call: Generate) -> None:
        call_id = call.call_id
        extra: dict[str, Any] = {}
        if call.previews:

            def on_preview(index: int, preview_index: int, image: Any) -> None:
                self.send(Preview(call_id, index, preview_index, put_image(self.folder, image)))

            extra["on_preview"] = on_preview
        hooks: dict[str, Any] = {
            "on_step": lambda done, total: self.send(Step(call_id, done, total)),
            "should_cancel": lambda: self._stopped(call_id),
            **extra,
        }
        try:
            images = [[take_image(ref) for ref in refs] for refs in call.images]
            if call.batch:
                outputs = list(engine.generate_batch(list(call.requests), images=images, **hooks))
            else:
                outputs = [
                    engine.generate(
                        call.requests[0],
                        images=images[0] if images else [],
                        extra_loras=[Path(p) for p in call.extra_loras],
                        **hooks,
                    )
                ]
            answer: ToParent = Result(
                call_id,
                tuple(
                    Output(
                        put_image(self.folder, out.image),
                        out.seed,
                        out.width,
                        out.height,
                        out.inference_time_s,
                    )
                    for out in outputs
                ),
            )
        except Exception as error:
            if not isinstance(error, QwenServeError):
                log.exception("the engine raised on call %d", call_id)
            answer = _failure(call_id, error)
        finally:
            with self._cancel_lock:  # call ids only grow: older cancels are moot now
                self._cancelled = {i for i in self._cancelled if i > call_id}
        self.send(_stats(engine))
        self.send(answer)

    def _warm_up(self, engine: Any, warm: WarmUp) -> None:
        try:
            timings = engine.warm_up(list(warm.slugs), batch_sizes=warm.batch_sizes)
            answer: ToParent = WarmedUp(warm.call_id, dict(timings))
        except Exception as error:
            answer = _failure(warm.call_id, error)
        self.send(_stats(engine))
        self.send(answer)

    def _count_tokens(self, spec: EngineSpec) -> None:
        counter = None
        if spec.count_tokens:
            from qwenserve.runtime.prompt_tokens import PromptTokenCounter

            counter = PromptTokenCounter(spec.config.weights, spec.config.cache_dir)
        while True:
            ask = self._counts.get()
            try:
                count = counter(ask.recipe, ask.text) if counter is not None else None
            except Exception:
                log.warning("counting a prompt's tokens failed", exc_info=True)
                count = None
            self.send(TokenCount(ask.call_id, count))


def _stats(engine: Any) -> Stats:
    """What the parent reads between calls (nothing here waits for the engine's lock)."""
    return Stats(
        resident=tuple(engine.resident()),
        compile_counts=engine.compile_counts() if isinstance(engine, CountsCompiles) else {},
        pipeline_counts=engine.pipeline_counts() if isinstance(engine, CountsPipelines) else {},
        device_memory=engine.device_memory() if isinstance(engine, ReportsDeviceMemory) else {},
    )


def _failure(call_id: int, error: BaseException) -> Failed:
    if isinstance(error, QwenServeError):
        fields = (
            tuple((e.field, e.message) for e in error.errors)
            if isinstance(error, InvalidRequest)
            else ()
        )
        return Failed(call_id, type(error).__name__, error.message, error.field, fields)
    return Failed(call_id, type(error).__name__, str(error))
