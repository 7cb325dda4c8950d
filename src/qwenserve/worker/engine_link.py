"""One engine child process and the parent's end of its pipe (``EngineProcess`` keeps one
alive, starting a new one when it dies).

A reader thread takes every message the child sends: progress and previews go to the
waiting call's callbacks as they come (so the runner's step hooks, stop checks and preview
storage stay in the parent, unchanged), answers complete the call. When the pipe breaks (the
child was killed, segfaulted, or the OOM killer took it) every call in flight fails with
``EngineCrashed`` saying how it died, and its exchange folder (images not yet read) goes.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import shutil
import signal
import socket
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from qwenserve import errors
from qwenserve.errors import EngineCrashed, FieldError, InvalidRequest, QwenServeError
from qwenserve.worker.engine_child import EngineSpec, main
from qwenserve.worker.engine_messages import (
    Cancel,
    Failed,
    Preview,
    Ready,
    Stats,
    Step,
    ToChild,
    ToParent,
    exchange_folder,
    take_image,
)

log = logging.getLogger("qwenserve.worker")

_SPAWN = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
_LIVE: weakref.WeakSet[Link] = weakref.WeakSet()


@atexit.register  # runs before multiprocessing's exit hook, which would wait for the children
def _close_all() -> None:
    for link in list(_LIVE):
        link.close(timeout_s=5.0)


@dataclass
class Pending:
    """A call waiting for its answer; the reader fills it in."""

    on_step: Callable[[int, int], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_preview: Callable[[int, int, Any], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    answer: ToParent | None = None
    error: BaseException | None = None
    cancel_sent: bool = False


class Link:
    """A started child (``start`` returns at once; ``ready`` is set when its engine is built).

    Args:
        on_ready: called (reader thread) once the child said ``Ready``.
        on_stats: called with each ``Stats`` the child sends.
        on_death: called (reader thread) once, after every call in flight has failed.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        on_ready: Callable[[Link], None],
        on_stats: Callable[[Stats], None],
        on_death: Callable[[Link], None],
    ) -> None:
        self.folder = exchange_folder()
        self._on_ready, self._on_stats, self._on_death = on_ready, on_stats, on_death
        conn, child_conn = _SPAWN.Pipe(duplex=True)
        self.process = _SPAWN.Process(
            target=main, args=(child_conn, spec, str(self.folder)), name="qwenserve-engine"
        )
        self.conn = conn
        self.info: Ready | None = None
        self.ready = threading.Event()
        self.dead = threading.Event()
        self.death = ""
        """How the child died, for ``EngineCrashed`` ("killed by SIGKILL")."""
        self._start_error = ""
        self.closing = False
        """Closed on purpose (shutdown, exit): its end is no crash."""
        self._calls: dict[int, Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.process.start()
        child_conn.close()  # else the pipe never reads as broken when the child dies
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read, name="engine-link", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def crashed(self) -> EngineCrashed:
        return EngineCrashed(f"the engine process died while running this job ({self.death})")

    def call(self, call_id: int, pending: Pending, message: ToChild) -> None:
        """Send ``message`` for a call whose answer ``pending`` will hold.

        Raises:
            EngineCrashed: the child is dead already.
        """
        with self._lock:
            if self.dead.is_set():
                raise self.crashed()
            self._calls[call_id] = pending
        self.send(message)

    def send(self, message: ToChild) -> None:
        """Send, or nothing when the pipe broke (the reader is failing the calls meanwhile)."""
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, ValueError):
            log.debug("engine link: send failed (the child is gone)")

    def forget(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)

    def close(self, timeout_s: float = 10.0) -> None:
        """End the child: its pipe shuts (it exits at once), then SIGKILL if it lingers."""
        self.closing = True
        _LIVE.discard(self)
        shut(self.conn)
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self._reader.join(timeout_s)

    # --- the reader thread ----------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError, ValueError):
                break
            try:
                self._handle(message)
            except Exception:  # a callback's bug must not stop the link
                log.exception("engine link: handling %s failed", type(message).__name__)
        self._died()

    def _handle(self, message: ToParent) -> None:
        if isinstance(message, Stats):
            self._on_stats(message)
            return
        if isinstance(message, Ready):
            self.info = message
            self.ready.set()
            self._on_ready(self)
            return
        if isinstance(message, Failed) and message.call_id == 0:
            self._start_error = f"{message.error_type}: {message.message}"
            return
        with self._lock:
            pending = self._calls.get(message.call_id)
        if pending is None:
            return
        if isinstance(message, Step):
            if pending.on_step is not None:
                pending.on_step(message.done, message.total)
            self.check_cancel(message.call_id, pending)
        elif isinstance(message, Preview):
            image = take_image(message.image)
            if pending.on_preview is not None:
                pending.on_preview(message.index, message.preview_index, image)
        else:
            self.forget(message.call_id)
            if isinstance(message, Failed):
                pending.error = rebuild(message)
            else:
                pending.answer = message
            pending.done.set()

    def check_cancel(self, call_id: int, pending: Pending) -> None:
        """Tell the child to stop the call once the runner's stop check says so (once)."""
        if pending.cancel_sent or pending.should_cancel is None or not pending.should_cancel():
            return
        pending.cancel_sent = True
        self.send(Cancel(call_id))

    def _died(self) -> None:
        self.process.join(5.0)
        self.death = describe_exit(self.process.exitcode)
        if self._start_error:
            self.death += f"; {self._start_error}"
        with self._lock:
            self.dead.set()
            calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.error = self.crashed()
            pending.done.set()
        shutil.rmtree(self.folder, ignore_errors=True)
        self._on_death(self)


def shut(conn: Connection) -> None:
    """Shut both directions of the pipe's socket, then close our end.

    Closing alone is not enough: the reader thread blocked in ``recv`` on this end keeps the
    socket open in the kernel, so the child never reads its end of file and ``close`` waited
    its whole join timeout (10 s) before a SIGKILL. A shutdown ends that ``recv`` here and the
    child's, which exits at once (``engine_child._Child._read``)."""
    with contextlib.suppress(OSError, ValueError):
        # The connection's own descriptor, borrowed (detached again: closing is ours below).
        sock = socket.socket(fileno=conn.fileno())
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()
    with contextlib.suppress(OSError):
        conn.close()


def describe_exit(exitcode: int | None) -> str:
    """How a child ended, in words: "killed by SIGKILL", "exited with status 1"."""
    if exitcode is None:
        return "its pipe closed"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def rebuild(failed: Failed) -> BaseException:
    """The child's error as the parent raises it: a ``qwenserve.errors`` class as itself (an
    ``InvalidRequest`` with its fields), a ``MemoryError`` as one; anything else is a crash of
    engine code, a ``RuntimeError`` carrying its type and text (logged, never shown)."""
    error_cls = getattr(errors, failed.error_type, None)
    if isinstance(error_cls, type) and issubclass(error_cls, QwenServeError):
        if issubclass(error_cls, InvalidRequest):
            fields = [FieldError(name, text) for name, text in failed.fields]
            return error_cls(failed.message, field=failed.field, errors=fields)
        try:
            return error_cls(failed.message, field=failed.field)
        except TypeError:  # a class with another constructor: the message still says it
            return QwenServeError(failed.message, field=failed.field)
    if failed.error_type == "MemoryError":
        return MemoryError(failed.message)
    return RuntimeError(f"{failed.error_type} in the engine process: {failed.message}")
