"""``ENGINE_PROCESS=false`` keeps the engine a thread of ``serve``'s own process (tests,
debuggers): no child is started, the job completes all the same."""

from __future__ import annotations

from pathlib import Path

from tests.processes import Server
from tests.worker_process.children import maps_torch, spawned_child, terminal, wait_for
from tests.worker_process.test_crash_serve import QUICK, submit


def test_serve_with_the_engine_in_its_own_process(tmp_path: Path, shared_cache: Path) -> None:
    server = Server(
        data_dir=tmp_path / "data",
        cache_dir=shared_cache,
        extra_env={"QWENSERVE_ENGINE_PROCESS": "false"},
    )
    try:
        server.start()
        assert server.process is not None
        key = server.create_key(credits=5.0)
        job = submit(server, key, QUICK)
        done = wait_for(lambda: terminal(server.url, key, job), 120, "the job's end")
        assert done["status"] == "COMPLETED", done
        assert spawned_child(server.process.pid) is None
        assert maps_torch(server.process.pid)
    finally:
        server.stop()
