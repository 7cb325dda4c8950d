"""The engine in a child process, driven through ``EngineProcess`` with torch-free engines
that fail the ways real ones do (``engines.py``): what crosses the boundary (images, previews,
progress, typed errors, cancels), and a child's death mid-call (SIGKILL, SIGSEGV) while the
parent lives on, in the proxy and in a real ``WorkerRunner`` on a real SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwenserve.catalog import validate_request
from qwenserve.errors import EngineCrashed, InferenceError, InvalidInput
from qwenserve.jobs import JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.store.sqlite import SqliteStore
from qwenserve.worker.engine_child import EngineSpec
from qwenserve.worker.engine_process import EngineProcess
from tests.service.test_worker import Clock, balance, enqueue, runner

FAKE = "tests.worker_process.engines:FakeEngine"


def spec(tmp_path: Path, **config: Any) -> EngineSpec:
    return EngineSpec(FAKE, {"marker_dir": str(tmp_path), **config}, count_tokens=False)


@pytest.fixture
def child(tmp_path: Path) -> Iterator[EngineProcess]:
    engine = EngineProcess(spec(tmp_path), batch_key=lambda _r: None).start()
    yield engine
    engine.close()


def request(prompt: str = "a fox", steps: int = 3, seed: int = 5) -> Any:
    return validate_request("qwen-image-fast", {"prompt": prompt, "steps": steps, "seed": seed})


def test_result_progress_and_previews_cross_the_boundary(child: EngineProcess) -> None:
    steps: list[tuple[int, int]] = []
    previews: list[tuple[int, int, object]] = []
    out = child.generate(
        request(steps=3, seed=77),
        on_step=lambda done, total: steps.append((done, total)),
        on_preview=lambda i, k, image: previews.append((i, k, image.getpixel((0, 0)))),
    )
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert previews == [(0, 0, (0, 0, 0)), (0, 1, (1, 0, 0)), (0, 2, (2, 0, 0))]
    assert (out.width, out.height, out.seed) == (32, 16, 77)
    assert out.image.getpixel((5, 5)) == (77, 0, 0)
    assert child.resident() == ["fake/base"]  # from the Stats sent with the answer
    assert child.describe() == "fake engine; in its own process"
    leftovers = [p for p in Path(child._link.folder).iterdir()] if child._link else []
    assert leftovers == []  # every image file was read once and deleted


def test_a_typed_error_crosses_as_itself(child: EngineProcess) -> None:
    with pytest.raises(InvalidInput) as raised:
        child.generate(request("raise"))
    assert raised.value.field == "image"
    assert [e.field for e in raised.value.errors] == ["image"]
    assert child.generate(request()).seed == 5  # the child goes on


def test_a_stop_reaches_the_child_within_a_step(tmp_path: Path) -> None:
    engine = EngineProcess(spec(tmp_path, step_s=0.1), batch_key=lambda _r: None).start()
    try:
        seen: list[int] = []
        with pytest.raises(InferenceError, match="cancelled"):
            engine.generate(
                request(steps=16),
                on_step=lambda done, _total: seen.append(done),
                should_cancel=lambda: len(seen) >= 3,
            )
        assert 3 <= max(seen) <= 4, seen  # stopped at the step it was seen, or the next
    finally:
        engine.close()


@pytest.mark.parametrize(("prompt", "how"), [("sigkill", "SIGKILL"), ("segfault", "SIGSEGV")])
def test_a_child_that_dies_mid_call_fails_the_call_and_a_new_one_serves(
    child: EngineProcess, prompt: str, how: str
) -> None:
    first = child.pid
    assert first is not None
    with pytest.raises(EngineCrashed, match=f"engine process died.*{how}"):
        child.generate(request(prompt))
    out = child.generate(request(seed=9))  # waits for the new child
    assert out.image.getpixel((0, 0)) == (9, 0, 0)
    assert child.pid not in (None, first) and child.crashes == 1
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)


def test_a_child_that_cannot_build_its_engine_says_why(tmp_path: Path) -> None:
    broken = EngineSpec("tests.worker_process.engines:failing_build", {}, count_tokens=False)
    with pytest.raises(EngineCrashed, match="no such device: tpu"):
        EngineProcess(broken, batch_key=lambda _r: None, start_timeout_s=120).start()


def test_close_ends_the_child(tmp_path: Path) -> None:
    engine = EngineProcess(spec(tmp_path), batch_key=lambda _r: None).start()
    pid = engine.pid
    assert pid is not None
    engine.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(EngineCrashed):
        engine.generate(request())


# --- the runner over a child: jobs given back like a lost lease, or failed refunded --------------
def test_a_job_whose_engine_died_runs_again_and_completes_once(
    tmp_path: Path, store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    engine = EngineProcess(spec(tmp_path), batch_key=lambda _r: None).start()
    worker = runner(store, media, engine, clock)
    try:
        job = enqueue(store, request("sigkill-once"), "job-crash-once", key_id, clock, cost=0.1)
        assert worker.run_once()
        stored = store.get_job(job.id, now=clock())
        assert stored is not None and stored.status is JobStatus.PROCESSING  # its lease ended
        assert worker.run_once()  # the next claim retakes it (attempt 2) in the new child
        worker.wait_finished()
        stored = store.get_job(job.id, now=clock())
        assert stored is not None and stored.status is JobStatus.COMPLETED, stored
        assert stored.attempts == 2
        assert balance(store, key_id) == pytest.approx(0.9)  # charged once
        assert engine.crashes == 1
    finally:
        worker.stop()
        worker.close()
        engine.close()


def test_a_job_that_kills_every_child_fails_refunded_after_max_attempts(
    tmp_path: Path, store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    engine = EngineProcess(spec(tmp_path), batch_key=lambda _r: None).start()
    worker = runner(store, media, engine, clock)  # max_attempts=2
    try:
        poison = enqueue(store, request("sigkill"), "job-poison", key_id, clock, cost=0.1)
        assert worker.run_once() and worker.run_once()
        stored = store.get_job(poison.id, now=clock())
        assert stored is not None and stored.status is JobStatus.FAILED, stored
        assert stored.error_kind == "EngineCrashed"
        assert "engine process died" in (stored.error or "")
        assert "SIGKILL" in (stored.error or "")
        assert balance(store, key_id) == pytest.approx(1.0)  # refunded
        fine = enqueue(store, request(seed=3), "job-after", key_id, clock, cost=0.1)
        started = time.monotonic()
        assert worker.run_once()
        worker.wait_finished()
        after = store.get_job(fine.id, now=clock())
        assert after is not None and after.status is JobStatus.COMPLETED
        assert time.monotonic() - started < 60
        assert engine.crashes == 2
    finally:
        worker.stop()
        worker.close()
        engine.close()


def test_the_parents_modules_import_no_torch() -> None:
    """Everything ``serve`` and ``worker`` import to run the API, the worker loop and the engine
    proxy (batch keys included) leaves torch to the child."""
    code = (
        "import sys, qwenserve.cli.serve, qwenserve.cli.worker, qwenserve.cli.compose;"
        "import qwenserve.worker.engine_process, qwenserve.runtime.batch_keys;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
