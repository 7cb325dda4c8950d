"""SIGKILL of the engine process mid-job under a real ``qwenserve serve`` (SQLite, tiny preset):
the API keeps answering within a second, the job runs again in a new engine process and
completes, the next job too, each charged once; a job whose engine dies on every attempt
fails after ``MAX_ATTEMPTS`` with the crash as its reason, refunded. And serve's own process
never loads torch: only its engine child does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import Server
from tests.worker_process.children import (
    answers_within_a_second,
    credits,
    denoising,
    engine_child,
    kill9,
    maps_torch,
    terminal,
    wait_for,
)

# As long as a tiny-preset job gets (the slug's most steps; sizes above 384² are generated at
# 384²): about a second on an idle machine, 15 ms a step. Its first step shows at once (the
# worker's heartbeat sends it), so the tests see it denoising and kill it well before its end.
SLOW = {"prompt": "a lighthouse", "steps": 75, "width": 512, "height": 512, "seed": 7}
QUICK = {"prompt": "a boat", "steps": 2, "width": 256, "height": 256, "seed": 8}
SLUG = "qwen-image-2512"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Iterator[Server]:
    """One serve for the module's tests (a start and its engine child cost ~10 s): each test
    has its own key and jobs, and what it checks in the log names its own job."""
    server = Server(
        data_dir=tmp_path_factory.mktemp("crash") / "data",
        cache_dir=shared_cache,
        extra_env={"QWENSERVE_LEASE_S": "6", "QWENSERVE_MAX_ATTEMPTS": "2"},
    )
    try:
        server.start(wait=False).wait_healthy(timeout_s=180)
        yield server
    finally:
        server.stop()


def submit(server: Server, key: str, body: dict[str, object]) -> str:
    response = httpx.post(
        f"{server.url}/v2/{SLUG}", json=body, headers={"x-api-key": key}, timeout=30
    )
    assert response.status_code == 200, response.text
    return str(response.json()["request_id"])


def tail(server: Server) -> Callable[[], str]:
    """The server's log tail, for a wait that timed out."""
    return lambda: f"--- serve's log, last 6000 characters ---\n{server.logs()[-6000:]}"


def price(server: Server) -> float:
    return float(
        next(m for m in httpx.get(f"{server.url}/v1/models").json()["data"] if m["id"] == SLUG)[
            "price_usd"
        ]
    )


def test_serve_survives_its_engine_killed_mid_job(server: Server) -> None:
    assert server.process is not None
    child = engine_child(server.process.pid)
    assert maps_torch(child) and not maps_torch(server.process.pid)
    key = server.create_key(credits=10.0)
    before = credits(server.url, key)
    job = submit(server, key, SLOW)
    wait_for(lambda: denoising(server.url, key, job), 120, "denoising job", tail(server))
    kill9(child)
    assert answers_within_a_second(server.url, key, job, for_s=2.0) >= 6
    done = wait_for(lambda: terminal(server.url, key, job), 240, "end of the killed job")
    assert done["status"] == "COMPLETED", done
    new_child = engine_child(server.process.pid)
    assert new_child != child
    after = submit(server, key, QUICK)
    assert (
        wait_for(lambda: terminal(server.url, key, after), 120, "next job")["status"] == "COMPLETED"
    )
    assert before - credits(server.url, key) == pytest.approx(2 * price(server))  # once each
    logs = server.logs()
    assert f"job {job} back to the queue (attempt 1 of 2)" in logs
    assert "killed by SIGKILL" in logs
    assert not maps_torch(server.process.pid)  # still: the restart happened in a child


def test_a_job_whose_engine_dies_every_time_fails_refunded(server: Server) -> None:
    assert server.process is not None
    key = server.create_key(credits=10.0)
    before = credits(server.url, key)
    job = submit(server, key, SLOW)
    child = engine_child(server.process.pid)
    for attempt in (1, 2):
        # Claimed again (its progress reset by the claim) before its denoise is watched for.
        started = f"job {job} started slug={SLUG} attempt={attempt}"
        wait_for(lambda: started in server.logs(), 180, started, tail(server))  # noqa: B023
        wait_for(
            lambda: denoising(server.url, key, job),
            180,
            f"denoising, attempt {attempt}",
            tail(server),
        )
        kill9(child)
        dead, child = child, engine_child(server.process.pid)
        assert child != dead
    done = wait_for(lambda: terminal(server.url, key, job), 60, "the job's end")
    assert done["status"] == "FAILED", done
    assert "engine process died" in str(done.get("error")), done
    assert credits(server.url, key) == pytest.approx(before)  # refunded
    after = submit(server, key, QUICK)
    assert (
        wait_for(lambda: terminal(server.url, key, after), 120, "next job")["status"] == "COMPLETED"
    )
