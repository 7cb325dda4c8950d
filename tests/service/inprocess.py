"""The API in-process over ASGI, on a real store (SQLite file or redis-server), with the test
playing the worker through the store's own calls (claim, heartbeat, complete, fail)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from qwenserve.accounts.keys import create_api_key
from qwenserve.api.app import create_app
from qwenserve.api.services import Services
from qwenserve.config import Settings
from qwenserve.jobs import CANCELLED, Job, JobResult, Progress
from qwenserve.media.storage import LocalMediaStore, new_media_id
from qwenserve.store.base import Heartbeat, Store
from tests.service.helpers import body_for

WORKER = "test-worker"
LEASE_S = 60.0


class Clock:
    """An injected clock (real time at the start; moves only when told)."""

    def __init__(self) -> None:
        self.now = time.time()

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """One app over one store; ``http`` talks to it in-process."""

    services: Services
    app: FastAPI
    store: Store
    media: LocalMediaStore
    clock: Clock
    http: httpx.AsyncClient
    key: str
    key_id: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"x-api-key": key or self.key}

    def new_key(self, credits_usd: float = 10.0) -> tuple[str, str]:
        plaintext, record = create_api_key(
            self.store, name="other", credits_usd=credits_usd, rpm=0, now=self.clock.now
        )
        return plaintext, record.id

    async def submit(self, slug: str = "qwen-image-fast", **overrides: object) -> str:
        response = await self.http.post(
            f"/v2/{slug}", json=body_for(slug, **overrides), headers=self.headers()
        )
        assert response.status_code == 200, response.text
        request_id: str = response.json()["request_id"]
        return request_id

    async def status(self, request_id: str, key: str | None = None) -> httpx.Response:
        return await self.http.get(f"/v2/requests/{request_id}/status", headers=self.headers(key))

    async def credits(self) -> float:
        response = await self.http.get("/v1/get-user-credits", headers=self.headers())
        return float(response.json()["credits"])

    # --- the test as the worker ----------------------------------------------------------
    def claim(self, slug: str | None = None) -> Job:
        jobs = self.store.claim(
            WORKER,
            slugs=[slug] if slug else None,
            lease_s=LEASE_S,
            max_attempts=3,
            now=self.clock.now,
        )
        assert len(jobs) == 1
        return jobs[0]

    def beat(self, job_id: str, step: int | None, total: int = 8) -> Heartbeat:
        report = Progress(step, total) if step is not None else None
        return self.store.heartbeat(WORKER, {job_id: report}, lease_s=LEASE_S, now=self.clock.now)

    def complete(self, job_id: str) -> None:
        media_id = new_media_id()
        self.media.put(media_id, b"\x89PNG fake", "image/png", expires_at=self.clock.now + 3600)
        result = JobResult(media_id, "image/png", 64, 64, 1, 1.5, 9)
        assert self.store.complete(job_id, WORKER, result, now=self.clock.now)

    def fail_cancelled(self, job_id: str) -> None:
        assert self.store.fail(
            job_id, WORKER, kind=CANCELLED, message="cancelled by its owner", now=self.clock.now
        )


def open_test_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Store]:
    if kind == "sqlite":
        from qwenserve.store.sqlite import SqliteStore

        store: Store = SqliteStore(tmp_path / "qwenserve.db")
    else:
        from qwenserve.store.redis import RedisStore

        url = request.getfixturevalue("redis_url")
        store = RedisStore.from_url(url, namespace=f"t{uuid.uuid4().hex[:10]}")
    yield store
    store.close()


async def make_harness(store: Store, tmp_path: Path, **settings: Any) -> AsyncIterator[Harness]:
    clock = Clock()
    media = LocalMediaStore(tmp_path / "media")
    services = Services(
        settings=Settings(data_dir=tmp_path, events_poll_s=0.02, wait_poll_s=0.02, **settings),
        store=store,
        media=media,
        clock=clock,
    )
    plaintext, record = create_api_key(store, name="owner", credits_usd=10.0, rpm=0, now=clock.now)
    app = create_app(services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
        yield Harness(services, app, store, media, clock, http, plaintext, record.id)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The events of a Server-Sent Events body: ``{"event", "id", "data"}`` each (pings out)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "event" in fields or "data" in fields:
            events.append(
                {
                    "event": fields.get("event"),
                    "id": fields.get("id"),
                    "data": json.loads(fields["data"]) if "data" in fields else None,
                }
            )
    return events
