"""Issue 13's load test, scaled to a small machine: concurrent clients on two API nodes, one
worker, and Redis killed (SIGKILL) for ten seconds in the middle of the load.

Done when every accepted job ends (COMPLETED or FAILED), exactly once (one terminal event in its
log), and the credits are exact: charged once per completion, refunded for a failure, never for
a submit the client was refused. Redis writes its append-only file with ``appendfsync always``,
so whatever it acknowledged survives the kill.

Scale (2 cores): 40 clients, 100 submits spread over ~20 s, the outage from 6 s to 16 s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from qwenserve.catalog import MODELS
from qwenserve.jobs import JobEventType
from qwenserve.store.redis import RedisStore
from tests.processes import Server, WorkerProcess, qwenserve
from tests.redis_server import RedisServer, needs_redis
from tests.service.helpers import body_for

pytestmark = [pytest.mark.slow, pytest.mark.redis, needs_redis]

SLUG = "qwen-image-fast"
CLIENTS = 40
SUBMITS = 100
SUBMIT_SPAN_S = 20.0
OUTAGE_AT_S = 6.0
OUTAGE_S = 10.0
TRIES_PER_SUBMIT = 4
"""Half the submits are tried up to this often, each retry after the 503's Retry-After (with the
same Idempotency-Key); the other half give up at the first 503, so some submits are refused for
good and must cost nothing."""
RETRY_AFTER_CAP_S = 6.0
CREDITS = 10.0
END_WAIT_S = 60.0
TERMINAL = ("COMPLETED", "FAILED")


@dataclass
class Tally:
    """What the clients saw."""

    accepted: dict[str, str] = field(default_factory=dict)
    """request id → the Idempotency-Key of the submit that got it."""
    refused: int = 0
    """Submits given up after their tries, every one answered 503."""
    unavailable: list[httpx.Response] = field(default_factory=list)
    """Every 503 (each must carry Retry-After and no internal detail)."""
    unexpected: list[str] = field(default_factory=list)
    """Anything else: another status, a connection error, a timeout."""


@dataclass
class Rig:
    redis: RedisServer
    apis: list[Server]
    worker: WorkerProcess
    key: str


@pytest.fixture
def rig(tmp_path: Path, shared_cache: Path) -> Iterator[Rig]:
    redis = RedisServer(appendonly=True, appendfsync="always", dir=tmp_path / "redis")
    redis.start()
    apis: list[Server] = []
    worker: WorkerProcess | None = None
    try:
        # The worker first: importing torch is the slow part, and it overlaps the API nodes'.
        worker = WorkerProcess(
            store_url=redis.url,
            data_dir=tmp_path / "worker",
            cache_dir=shared_cache,
            extra_env={
                "QWENSERVE_LEASE_S": "3",
                "QWENSERVE_MAX_BATCH": "8",
                "QWENSERVE_LOG_LEVEL": "INFO",
            },
        ).start()
        env = {"QWENSERVE_STORE": redis.url, "QWENSERVE_LOG_LEVEL": "INFO"}
        apis = [
            Server(
                data_dir=tmp_path / f"api{i}",
                cache_dir=shared_cache,
                extra_env=env,
                args=["--workers", "0"],
            ).start(wait=False)  # both import at once; waited for below
            for i in range(2)
        ]
        for api in apis:
            api.wait_healthy()
        out = qwenserve(
            "keys",
            "create",
            "--store",
            redis.url,
            "--credits",
            str(CREDITS),
            "--rpm",
            "0",
            env={"QWENSERVE_DATA_DIR": str(tmp_path / "cli")},
        )
        _wait_for_worker(apis[0], worker)
        yield Rig(redis, apis, worker, out.strip().splitlines()[-1])
    finally:
        children: list[Server | WorkerProcess] = [*apis, *([worker] if worker else [])]
        with ThreadPoolExecutor(len(children) or 1) as pool:  # their drains overlap
            list(pool.map(lambda child: child.stop(), children))
        redis.stop()


def _wait_for_worker(api: Server, worker: WorkerProcess, timeout_s: float = 60) -> None:
    """Until the worker has announced itself, so the outage lands on a worker that is running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert worker.process is not None and worker.process.poll() is None, worker.logs()
        if "qwenserve_workers 1.0" in httpx.get(f"{api.url}/metrics", timeout=5).text:
            return
        time.sleep(0.2)
    raise AssertionError(f"the worker did not start in {timeout_s}s:\n{worker.logs()}")


async def _submit(
    client: httpx.AsyncClient, rig: Rig, n: int, started: float, tally: Tally
) -> None:
    """Submit number ``n`` at its time, to API node ``n % 2``; half of each node's submits retry
    a 503 (``TRIES_PER_SUBMIT``), the other half give up at the first."""
    await asyncio.sleep(max(0.0, started + n * SUBMIT_SPAN_S / SUBMITS - time.monotonic()))
    api = rig.apis[n % len(rig.apis)]
    idempotency_key = str(uuid.uuid4())  # a retry after a lost reply is the same submit
    headers = {"x-api-key": rig.key, "Idempotency-Key": idempotency_key}
    tries = TRIES_PER_SUBMIT if (n // 2) % 2 == 0 else 1
    for attempt in range(tries):
        try:
            response = await client.post(
                f"{api.url}/v2/{SLUG}", headers=headers, json=body_for(SLUG, seed=n, steps=1)
            )
        except httpx.HTTPError as error:
            tally.unexpected.append(f"submit {n}: {type(error).__name__}: {error}")
            return
        if response.status_code == 200:
            tally.accepted[str(response.json()["request_id"])] = idempotency_key
            return
        if response.status_code != 503:
            tally.unexpected.append(f"submit {n}: {response.status_code} {response.text}")
            return
        tally.unavailable.append(response)
        if attempt + 1 < tries:
            await asyncio.sleep(
                min(float(response.headers.get("Retry-After", "1")), RETRY_AFTER_CAP_S)
            )
    tally.refused += 1


async def _client(
    client: httpx.AsyncClient, rig: Rig, mine: list[int], started: float, tally: Tally
) -> None:
    for n in mine:
        await _submit(client, rig, n, started, tally)


async def _outage(redis: RedisServer) -> None:
    await asyncio.sleep(OUTAGE_AT_S)
    await asyncio.to_thread(redis.kill)
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(redis.start)


async def _load(rig: Rig) -> Tally:
    tally = Tally()
    started = time.monotonic()
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(
            _outage(rig.redis),
            *(
                _client(client, rig, list(range(c, SUBMITS, CLIENTS)), started, tally)
                for c in range(CLIENTS)
            ),
        )
    return tally


async def _wait_terminal(rig: Rig, ids: list[str]) -> dict[str, str]:
    """Each job's status as the API reads it, once all are terminal or ``END_WAIT_S`` passed."""
    states: dict[str, str] = {}
    deadline = time.monotonic() + END_WAIT_S
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=8)) as client:

        async def read(n: int, request_id: str) -> None:
            api = rig.apis[n % len(rig.apis)]
            response = await client.get(
                f"{api.url}/v2/requests/{request_id}/status", headers={"x-api-key": rig.key}
            )
            states[request_id] = (
                str(response.json()["status"])
                if response.status_code in (200, 422)
                else f"HTTP {response.status_code}"
            )

        while time.monotonic() < deadline:
            pending = [i for i in ids if states.get(i) not in TERMINAL]
            if not pending:
                break
            await asyncio.gather(*(read(n, i) for n, i in enumerate(pending)))
            await asyncio.sleep(0.5)
    return states


def test_redis_killed_under_load_every_accepted_job_ends_once_credits_exact(rig: Rig) -> None:
    began = time.monotonic()
    tally = asyncio.run(_load(rig))
    load_s = time.monotonic() - began
    assert not tally.unexpected, tally.unexpected
    # The outage was seen, and said so the way a client can act on: 503, Retry-After, no detail.
    assert tally.unavailable, "no submit met the outage"
    assert tally.refused > 0, "no submit was refused for good"
    for response in tally.unavailable:
        assert int(response.headers["Retry-After"]) >= 1
        text = response.text.lower()
        for detail in ("127.0.0.1", str(rig.redis.port), "refused", "redis", "traceback"):
            assert detail not in text, response.text
    assert len(tally.accepted) + tally.refused == SUBMITS
    assert len(set(tally.accepted.values())) == len(tally.accepted)  # one job per submit

    ids = list(tally.accepted)
    states = asyncio.run(_wait_terminal(rig, ids))
    stuck = {i: s for i, s in states.items() if s not in TERMINAL}
    assert not stuck, (
        f"{len(stuck)} accepted jobs did not end: {stuck}\n{rig.worker.logs()[-4000:]}"
    )
    completed = [i for i in ids if states[i] == "COMPLETED"]

    store = RedisStore.from_url(rig.redis.url)
    try:
        for request_id in ids:
            endings = [e for e in store.job_events(request_id) if e.type.is_terminal]
            assert len(endings) == 1, (request_id, endings)
            expected = (
                JobEventType.COMPLETED if states[request_id] == "COMPLETED" else JobEventType.FAILED
            )
            assert endings[0].type is expected, (request_id, endings)
    finally:
        store.close()

    price = MODELS[SLUG].price_usd
    credits = httpx.get(
        f"{rig.apis[1].url}/v1/get-user-credits", headers={"x-api-key": rig.key}, timeout=10
    ).json()["credits"]
    assert credits == pytest.approx(CREDITS - price * len(completed), abs=1e-9), (
        len(completed),
        len(ids),
        tally.refused,
    )
    # Both API nodes came through it.
    for api in rig.apis:
        assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
    print(
        f"load {load_s:.1f}s: accepted {len(ids)}, refused {tally.refused}, 503s "
        f"{len(tally.unavailable)}, completed {len(completed)}, failed {len(ids) - len(completed)}"
    )
