"""SIGTERM to a real ``qwenserve serve`` whose engine runs in its own process (SQLite, tiny
preset): an idle one exits at once, its engine child with it (closing the pipe alone left the
child waiting on a socket the parent's reader held open: every stop took the link's whole
10 s join timeout, then a SIGKILL); a busy one still drains its job to the end first."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from qwenserve.backends import SqliteTarget
from qwenserve.jobs import JobStatus
from qwenserve.store.sqlite import SqliteStore
from tests.processes import Server
from tests.worker_process.children import denoising, engine_child, wait_for
from tests.worker_process.test_crash_serve import SLOW, submit

IDLE_STOP_BOUND_S = 6.0
"""Seconds from SIGTERM to exit for an idle serve: ~0.5 s measured (engine in-process: ~2 s),
with room for a loaded 2-core machine; the old close could not take under 10 s."""


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_an_idle_serve_and_its_engine_child_stop_promptly(
    tmp_path: Path, shared_cache: Path
) -> None:
    server = Server(data_dir=tmp_path / "data", cache_dir=shared_cache)
    try:
        server.start(wait=False).wait_healthy(timeout_s=180)
        assert server.process is not None
        child = engine_child(server.process.pid)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(60)
        took_s = time.monotonic() - started
        assert code == 0, server.logs()
        assert took_s < IDLE_STOP_BOUND_S, (took_s, server.logs())
        assert wait_for(lambda: gone(child), 5, "the engine child's exit")
    finally:
        server.stop()


def test_a_busy_serve_drains_its_job_in_the_child_before_exiting(
    tmp_path: Path, shared_cache: Path
) -> None:
    data = tmp_path / "data"
    server = Server(data_dir=data, cache_dir=shared_cache)
    try:
        server.start(wait=False).wait_healthy(timeout_s=180)
        key = server.create_key(credits=5.0)
        job = submit(server, key, SLOW)
        wait_for(lambda: denoising(server.url, key, job), 120, "denoising job")
        assert server.terminate(timeout_s=120) == 0, server.logs()
    finally:
        server.stop()
    store = SqliteStore(SqliteTarget().file_in(data))
    try:
        ended = store.get_job(job, now=time.time())
    finally:
        store.close()
    # Finished during the drain, by the one attempt that was running: not given back.
    assert ended is not None and ended.status is JobStatus.COMPLETED, server.logs()
    assert ended.attempts == 1
