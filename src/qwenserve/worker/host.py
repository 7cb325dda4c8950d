"""Hosting runners in threads inside the server process, with a drain on shutdown. A runner's
engine runs in a child process by default (``engine_process.py``): the loop, its heartbeats and
its endings stay here."""

from __future__ import annotations

import logging
import threading

from qwenserve.worker.runner import WorkerRunner

log = logging.getLogger("qwenserve.worker")


class ThreadHost:
    """Runs each runner in its own thread; ``shutdown`` drains the jobs in hand."""

    def __init__(self, runners: list[WorkerRunner]) -> None:
        self.runners = runners
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for runner in self.runners:
            thread = threading.Thread(
                target=runner.run_forever, name=runner.config.worker_id, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def shutdown(self, drain_timeout_s: float) -> None:
        """Stop claiming; wait up to ``drain_timeout_s`` for jobs in hand, then give them back."""
        for runner in self.runners:
            runner.stop()
        for thread in self._threads:
            thread.join(drain_timeout_s)
        stuck = [r for r, t in zip(self.runners, self._threads, strict=True) if t.is_alive()]
        for runner in stuck:
            log.warning(
                "worker %s: drain timed out, returning its job to the queue",
                runner.config.worker_id,
            )
            runner.cancel_current()
        for thread in self._threads:
            thread.join(10.0)
        self._threads.clear()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)
