"""A cancel reaches the running denoise loop at the next step boundary: it is pushed to the
worker holding the job (the event log read at once, then one heartbeat), never left for the
next heartbeat period.

Every worker here heartbeats every hour (``NEVER_S``) and its event-log reader polls every
hour too, so a job that stops within a step of its cancel was stopped by the push: in-process
(``serve`` on SQLite and on Redis: the API pokes its reader), and across processes on Redis
(an API node and a worker that share only the redis-server, each with its own connection, in
this test process: the cancel channel wakes the worker's reader). On SQLite a separate worker
has no channel: its reader's poll (``event_poll_s``) carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwenserve.accounts.keys import create_api_key
from qwenserve.api.app import create_app
from qwenserve.api.services import Services
from qwenserve.backends import Backend, LocalSignals, RedisSignals
from qwenserve.cli.compose import push_cancels
from qwenserve.config import Settings
from qwenserve.jobs import CANCELLED, JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.notify import EventFollower
from qwenserve.store.base import Store
from qwenserve.store.redis import RedisConnector
from qwenserve.store.workers import SqliteWorkerRegistry, WorkerRegistry
from qwenserve.worker.engine import ImageEngine
from qwenserve.worker.runner import WorkerRunner
from tests.service.helpers import body_for
from tests.service.inprocess import Clock
from tests.service.test_worker import runner
from tests.service.test_worker_control import NEVER_S, CountingStore, SteppingEngine

STEP_S = 0.8
"""Each fake denoising step: long enough that the push (a few store calls, a Redis pub/sub hop)
lands within one even on a machine whose cores the other test workers keep busy (0.4 s was
once too short there)."""
STEPS = 12
CANCEL_AFTER = 2
"""The test cancels once the engine has reported this step."""
TINY_STEPS = 16


@dataclass
class Node:
    """A worker (with its own store connection, event-log reader and cancel push) and an API
    that may or may not share its process."""

    http: httpx.AsyncClient
    api_store: Store
    worker: WorkerRunner
    key: str
    key_id: str
    reached: threading.Event
    credits_before: float = 0.0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A redis-server of this module's own: the signals use the default namespace."""
    from tests.redis_server import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer() as server:
        yield server.url


def _redis_parts(url: str) -> tuple[Store, WorkerRegistry]:
    from qwenserve.store.redis import RedisStore, RedisWorkerRegistry

    return RedisStore.from_url(url), RedisWorkerRegistry.from_url(url)


NODES = [
    "serve-sqlite",
    "worker-sqlite",
    pytest.param("serve-redis", marks=pytest.mark.redis),
    pytest.param("worker-redis", marks=pytest.mark.redis),
]


@contextlib.asynccontextmanager
async def open_node(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    engine: ImageEngine,
    reached: threading.Event,
) -> AsyncIterator[Node]:
    """``serve-*``: the worker in the API process (serve's wiring: the API pokes the reader).
    ``worker-*``: the API and the worker each with their own store connection and nothing
    else shared (a separate ``qwenserve worker``)."""
    setup, backend_kind = kind.split("-")
    clock = Clock()  # one clock for both sides: leases and expiry agree
    media = LocalMediaStore(tmp_path / "media")
    path = tmp_path / "qwenserve.db"
    url = request.getfixturevalue("redis_url") if backend_kind == "redis" else ""

    def open_parts() -> tuple[Store, WorkerRegistry]:
        if backend_kind == "redis":
            return _redis_parts(url)
        from qwenserve.store.sqlite import SqliteStore

        return SqliteStore(path), SqliteWorkerRegistry(path)

    worker_store, registry = open_parts()
    api_store = worker_store if setup == "serve" else open_parts()[0]
    backend = Backend(
        store=worker_store,
        registry=registry,
        media=media,
        signals=RedisSignals(RedisConnector.from_url(url)) if url else LocalSignals(),
    )
    worker = runner(worker_store, media, engine, clock, control_period_s=NEVER_S, lease_s=600.0)  # type: ignore[arg-type]
    # A separate SQLite worker has only its reader's poll (no channel): a quarter step here, so
    # the stop lands within the step on a busy machine too (its bound is that poll).
    poll_s = STEP_S / 4 if setup == "worker" and not url else NEVER_S
    events = EventFollower(worker_store, poll_s=poll_s).start()
    subscriber = push_cancels(backend, events, [worker])
    if url:  # wait until Redis confirms it: a cancel before would be missed
        from qwenserve.store.redis_wakeup import RedisCancelWakeup

        assert isinstance(subscriber, RedisCancelWakeup) and subscriber.wait_subscribed(10)
    services = Services(
        settings=Settings(data_dir=tmp_path, wait_poll_s=0.02),
        store=api_store,
        media=media,
        clock=clock,
        # serve's wiring; a separate worker's API node has no worker to tell in-process
        on_cancel_requested=(lambda _job_id: events.poke()) if setup == "serve" else None,
    )
    plaintext, key = create_api_key(api_store, name="owner", credits_usd=1.0, rpm=0, now=clock())
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
            yield Node(http, api_store, worker, plaintext, key.id, reached)
    finally:
        if subscriber is not None:
            subscriber.close()
        events.close()
        worker.close()
        for store in {id(worker_store): worker_store, id(api_store): api_store}.values():
            store.close()


@pytest.mark.parametrize("kind", NODES)
async def test_a_running_job_stops_within_one_step_of_its_cancel(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    reached = threading.Event()

    def at_step(step: int) -> None:
        if step == CANCEL_AFTER:
            reached.set()

    engine = SteppingEngine(step_s=STEP_S, at_step=at_step)
    async with open_node(kind, tmp_path, request, engine, reached) as node:
        began = time.monotonic()
        request_id = await _run_and_cancel(node, steps=STEPS)
        stopped_s = time.monotonic() - began
        # The heartbeat would not have come for an hour: the push stopped it at the next step.
        assert engine.cancelled_at is not None, f"ran all {engine.steps_run} steps"
        assert engine.cancelled_at <= CANCEL_AFTER + 1
        assert engine.steps_run <= CANCEL_AFTER + 1
        assert stopped_s < (CANCEL_AFTER + 2) * STEP_S + 1.0
        await _assert_cancelled_and_refunded(node, request_id)


class HoldAtStep:
    """The real engine, its step callback held at step ``at`` until the worker's control has
    a stop for the job (at most ``hold_s``): the cancel lands between two steps whatever the
    machine's speed, so the engine's own check (``runtime/run.py``) must stop it right there."""

    def __init__(self, inner: Any, at: int, reached: threading.Event, hold_s: float) -> None:
        self.inner = inner
        self.at = at
        self.reached = reached
        self.hold_s = hold_s
        self.stopped: Callable[[], bool] = lambda: False
        self.steps: list[int] = []

    def generate(self, request: Any, *, on_step: Any = None, **kwargs: Any) -> Any:
        def held(done: int, total: int) -> None:
            self.steps.append(done)
            if on_step is not None:
                on_step(done, total)
            if done == self.at:
                self.reached.set()
                deadline = time.monotonic() + self.hold_s
                while not self.stopped() and time.monotonic() < deadline:
                    time.sleep(0.005)

        return self.inner.generate(request, on_step=held, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def tiny_engine(shared_cache: Path) -> Any:
    from qwenserve.runtime import Engine, EngineConfig

    return Engine(EngineConfig(weights="tiny", cache_dir=shared_cache))


@pytest.mark.slow
async def test_the_tiny_preset_stops_at_the_step_where_the_cancel_lands(
    tmp_path: Path, request: pytest.FixtureRequest, tiny_engine: Any
) -> None:
    """Under ``serve`` on SQLite: one real pipeline call (the transport is the same for every
    node kind, tested above). Nothing runs after the cancel, not even the VAE decode of the
    image that would be discarded (seconds on a CPU: the tail a user waited out before)."""
    reached = threading.Event()
    engine = HoldAtStep(tiny_engine, CANCEL_AFTER, reached, hold_s=5.0)
    pipe = tiny_engine.prepare_call(_tiny_request()).pipeline
    decodes: list[object] = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda *_: decodes.append(None))
    try:
        async with open_node("serve-sqlite", tmp_path, request, engine, reached) as node:  # type: ignore[arg-type]
            held_jobs = node.worker.control
            engine.stopped = lambda: any(held_jobs.stop_reason(j) for j in held_jobs.held())
            request_id = await _run_and_cancel(node, steps=TINY_STEPS)
            assert engine.steps == list(range(1, CANCEL_AFTER + 1)), "no step after the cancel"
            assert decodes == [], "the discarded image was decoded"
            await _assert_cancelled_and_refunded(node, request_id)
    finally:
        hook.remove()


def _tiny_request() -> Any:
    from qwenserve.catalog import validate_request

    return validate_request("qwen-image-fast", body_for("qwen-image-fast", steps=TINY_STEPS))


async def _run_and_cancel(node: Node, *, steps: int) -> str:
    """Submit over v2, run it on the worker, cancel over v2 once the engine reached its step;
    returns when the worker has ended it."""
    headers = {"x-api-key": node.key}
    node.credits_before = await _credits(node)
    submitted = await node.http.post(
        "/v2/qwen-image-fast", json=body_for("qwen-image-fast", steps=steps), headers=headers
    )
    assert submitted.status_code == 200, submitted.text
    request_id: str = submitted.json()["request_id"]
    assert await _credits(node) < node.credits_before
    running = threading.Thread(target=node.worker.run_once, daemon=True)
    running.start()
    assert await asyncio.to_thread(node.reached.wait, 60), "the job never reached its step"
    cancelled = await node.http.post(f"/v2/requests/{request_id}/cancel", headers=headers)
    assert cancelled.status_code == 202, cancelled.text
    await asyncio.to_thread(running.join, 60)
    await asyncio.to_thread(node.worker.wait_finished)
    return request_id


async def _assert_cancelled_and_refunded(node: Node, request_id: str) -> None:
    status = await node.http.get(
        f"/v2/requests/{request_id}/status", headers={"x-api-key": node.key}
    )
    assert status.status_code == 422, status.text
    body = status.json()
    assert body["status"] == "FAILED" and body["error"].startswith("cancelled"), body
    job = node.api_store.get_job(request_id, now=time.time())
    assert job is not None and job.error_kind == CANCELLED and job.status is JobStatus.FAILED
    assert await _credits(node) == pytest.approx(node.credits_before), "refunded once"


async def _credits(node: Node) -> float:
    response = await node.http.get("/v1/get-user-credits", headers={"x-api-key": node.key})
    assert response.status_code == 200, response.text
    return float(response.json()["credits"])


def test_a_cancel_request_for_a_job_held_elsewhere_makes_no_store_call(
    store: Store, media: LocalMediaStore
) -> None:
    """The push reaches every worker of the process; only the holder heartbeats."""
    counting = CountingStore(store)
    worker = runner(counting, media, SteppingEngine(), Clock(), control_period_s=NEVER_S)  # type: ignore[arg-type]
    try:
        assert worker.control.cancel_requested(f"job-{uuid.uuid4().hex}") is False
        time.sleep(0.05)
        assert "heartbeat" not in counting.calls
    finally:
        worker.close()
