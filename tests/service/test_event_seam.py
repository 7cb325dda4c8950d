"""The event log as the seam (issue 20 §2), in-process on SQLite and on a real redis-server:
every kind of ending reaches an ending subscriber once, inline inputs go for jobs given up or
past their start deadline, one log reader serves every SSE stream of a process, and a webhook
body is the API's result body, rendered without the HTTP layer."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from qwenserve.api.app import _purge_loop
from qwenserve.api.webhooks import body_builder
from qwenserve.jobs import CANCELLED, EXPIRED, JobResult, JobStatus
from qwenserve.media.inline import stored_input_ids
from qwenserve.media.storage import new_media_id
from qwenserve.notify.bodies import render
from qwenserve.notify.endings import Ending
from qwenserve.notify.follower import EventFollower
from qwenserve.notify.webhooks import WebhookDispatcher
from qwenserve.store import rules
from qwenserve.store.base import Store
from tests.service.helpers import body_for, png_b64
from tests.service.inprocess import WORKER, Harness, make_harness, open_test_store, parse_sse
from tests.store.contract import make_job

EDIT = "qwen-image-edit-fast"


class CountingStore:
    """``store`` with its event-log reads counted (every other call passes through)."""

    COUNTED = ("events", "job_events")

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.COUNTED:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path, public_url="http://api.test"):
        try:
            yield harness
        finally:
            harness.services.close()


def settle(api: Harness) -> None:
    """What the process's reader has not read yet, read, and every ending handled."""
    api.services.events.catch_up()
    api.services.endings.close()  # waits for the endings handed to its thread


async def submit(api: Harness, slug: str = "qwen-image-fast", **headers: str) -> str:
    response = await api.http.post(
        f"/v2/{slug}",
        json=body_for(slug, **({"image": png_b64()} if slug == EDIT else {})),
        headers={**api.headers(), **headers},
    )
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def inputs_of(api: Harness, job_id: str) -> list[str]:
    job = api.store.get_job(job_id, now=api.clock.now)
    assert job is not None
    ids: list[str] = stored_input_ids(job.request)
    assert ids and all(api.media.get(i, now=api.clock.now) is not None for i in ids)
    return ids


def gone(api: Harness, media_ids: list[str]) -> bool:
    return all(api.media.get(i, now=api.clock.now) is None for i in media_ids)


async def test_every_kind_of_ending_reaches_a_new_subscriber_once(api: Harness) -> None:
    got: list[Ending] = []
    api.services.endings.subscribe(got.append)
    store, clock = api.store, api.clock
    expected: dict[str, tuple[str, str | None]] = {}

    done = await submit(api)
    api.claim()
    api.complete(done)
    expected[done] = ("completed", None)

    broken = await submit(api)
    api.claim()
    assert store.fail(broken, WORKER, kind="InferenceError", message="boom", now=clock.now)
    expected[broken] = ("failed", "InferenceError")

    queued = await submit(api)  # the API's cancel hands its ending over at once
    cancel = await api.http.post(f"/v2/requests/{queued}/cancel", headers=api.headers())
    assert cancel.status_code == 200
    expected[queued] = ("failed", CANCELLED)

    running = await submit(api)
    api.claim()
    cancel = await api.http.post(f"/v2/requests/{running}/cancel", headers=api.headers())
    assert cancel.status_code == 202
    api.fail_cancelled(running)
    expected[running] = ("failed", CANCELLED)

    tired = await submit(api)  # its worker dies; the next claim gives it up
    assert store.claim("dead", slugs=None, lease_s=1, max_attempts=1, now=clock.now)
    clock.advance(2)
    assert list(store.claim("w2", slugs=None, lease_s=1, max_attempts=1, now=clock.now)) == []
    expected[tired] = ("failed", rules.GIVE_UP_KIND)

    late = await submit(api, **{"X-Start-Timeout": "5"})
    clock.advance(6)
    assert list(store.claim("w2", slugs=None, lease_s=1, max_attempts=1, now=clock.now)) == []
    expected[late] = ("failed", rules.START_TIMEOUT_KIND)

    key = store.get_key(api.key_id)
    assert key is not None
    refused = dataclasses.replace(  # another node's submit its content policy refused
        make_job(key, cast(Any, clock), cost_usd=0.0),
        status=JobStatus.FAILED,
        error="blocked",
        error_kind="content_policy",
        finished_at=clock.now,
    )
    store.submit(refused, rpm=0, now=clock.now)
    expected[refused.id] = ("failed", "content_policy")

    stale = await submit(api)  # never runs: expires, refunded, by another node's purge
    settle(api)  # (the reader keeps up; the purge trims what it read)
    clock.advance(api.services.settings.result_ttl_s + 1)
    store.purge_expired(now=clock.now)
    expected[stale] = ("failed", EXPIRED)

    settle(api)
    seen = Counter(ending.event.job_id for ending in got)
    assert seen == Counter(expected.keys()), "each ending once, whoever made it"
    assert {e.event.job_id: (e.event.type.value, e.event.error_kind) for e in got} == expected
    assert all(e.job is not None for e in got if e.event.job_id != stale), "read for it"


async def test_given_up_and_late_jobs_lose_their_inline_inputs(api: Harness) -> None:
    store, clock = api.store, api.clock
    tired = await submit(api, EDIT)
    tired_inputs = inputs_of(api, tired)
    assert store.claim("dead", slugs=None, lease_s=1, max_attempts=1, now=clock.now)
    clock.advance(2)
    store.claim("w2", slugs=None, lease_s=1, max_attempts=1, now=clock.now)  # gives it up
    settle(api)  # the reader hands the give-up to the endings
    assert gone(api, tired_inputs), "given up: its stored inputs are deleted"

    late = await submit(api, EDIT, **{"X-Start-Timeout": "5"})
    late_inputs = inputs_of(api, late)
    clock.advance(6)
    purge = asyncio.create_task(_purge_loop(api.services))  # ends it (an idle cluster)
    try:
        for _ in range(200):
            if gone(api, late_inputs):
                break
            await asyncio.sleep(0.02)
    finally:
        purge.cancel()
    ended = store.get_job(late, now=clock.now)
    assert ended is not None and ended.error_kind == rules.START_TIMEOUT_KIND
    assert gone(api, late_inputs), "past its start deadline: its stored inputs are deleted"
    assert clock.now < ended.expires_at, "well before the result TTL would take them"


async def run_all(api: Harness, count: int) -> None:
    """Play the worker for ``count`` queued jobs, one after the other, slowly."""
    await asyncio.sleep(0.4)
    for _ in range(count):
        job = api.claim()
        await asyncio.sleep(0.1)
        api.complete(job.id)


@pytest.mark.parametrize("streams", [1, 6])
async def test_one_log_reader_serves_every_sse_stream(
    store: Store, tmp_path: Path, streams: int
) -> None:
    counting = CountingStore(store)
    async for api in make_harness(cast(Store, counting), tmp_path, event_poll_s=0.05):
        reader = api.services.events.start()  # as `serve` runs it
        try:
            ids = [await submit(api) for _ in range(streams)]
            opened = dict(counting.calls)

            responses = await asyncio.gather(
                *(api.http.get(f"/v2/requests/{i}/events", headers=api.headers()) for i in ids),
                run_all(api, len(ids)),
            )
        finally:
            api.services.close()
        for response in cast(list[httpx.Response], responses[:-1]):
            names = [e["event"] for e in parse_sse(response.text) if e["event"] != "progress"]
            assert names == ["queued", "processing", "completed"]
        # Every read of the whole log is the one reader's, however many streams are open;
        # a stream reads its own job's events only when it opens (and at its end at most).
        assert counting.calls["events"] == reader.reads
        per_stream = (counting.calls["job_events"] - opened.get("job_events", 0)) / streams
        assert per_stream <= 3, counting.calls


async def test_webhook_body_is_the_result_body_rendered_without_http(api: Harness) -> None:
    build = body_builder(api.services)

    url_job = await submit(api)
    api.claim()
    api.complete(url_job)

    response = await api.http.post(
        "/v2/qwen-image-fast",
        json=body_for("qwen-image-fast", base64=True),
        headers=api.headers(),
    )
    b64_job = response.json()["request_id"]
    api.claim()
    media_id = new_media_id()
    api.media.put(media_id, b"\x89PNG bytes", "image/png", expires_at=api.clock.now + 3600)
    result = JobResult(media_id, "image/png", 64, 64, 1, 1.5, 11)
    assert api.store.complete(b64_job, WORKER, result, now=api.clock.now)

    failed = await submit(api)
    await api.http.post(f"/v2/requests/{failed}/cancel", headers=api.headers())

    for job_id in (url_job, b64_job, failed):
        got = await api.http.get(f"/v2/requests/{job_id}", headers=api.headers())
        polled: dict[str, Any] = got.json()
        polled.pop("webhook", None)
        # Built here, on the event loop's own thread: no asyncio.run, no fake Request.
        body = build(job_id)
        assert body == render(polled), job_id
        assert json.loads(got.content)["request_id"] == job_id
    assert json.loads(build(b64_job) or "")["output"] == base64.b64encode(b"\x89PNG bytes").decode()
    assert json.loads(build(url_job) or "")["output"].startswith("http://api.test/media/")
    api.media.delete(media_id)
    assert build(b64_job) is None, "a base64 body whose image is gone: nothing to send"


async def test_webhooks_take_their_endings_from_the_one_reader(api: Harness) -> None:
    async def ended_with_webhook() -> str:
        response = await api.http.post(
            "/v2/qwen-image-fast",
            params={"webhook": "https://example.com/hook"},
            json=body_for("qwen-image-fast"),
            headers=api.headers(),
        )
        job_id: str = response.json()["request_id"]
        api.claim()
        api.complete(job_id)
        return job_id

    before_start = await ended_with_webhook()  # ended while no dispatcher ran
    counting = CountingStore(api.store)
    reader = EventFollower(api.store)
    sender = WebhookDispatcher(
        cast(Store, counting), body_for=body_builder(api.services), clock=api.clock
    )
    sender.follow_from(reader)
    try:
        assert sender.follow() == 1, "at start: read from the persisted cursor (durability)"
        assert api.store.get_webhook(before_start) is not None
        reads_at_start = counting.calls["events"]
        later = await ended_with_webhook()
        reader.catch_up()
        assert sender.follow() == 1, "then: handed over by the reader"
        assert sender.follow() == 0
        assert api.store.get_webhook(later) is not None
        assert counting.calls["events"] == reads_at_start, "no log read of its own"
    finally:
        sender.close()
        reader.close()


@pytest.mark.redis
async def test_two_nodes_each_handle_an_ending_once_and_the_actions_stay_single(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two API nodes over one Redis (and one media store): each node's endings handler runs
    once for an ending made elsewhere; deleting the inputs twice is harmless, and the webhook
    is one delivery whichever node enqueues it."""
    opened = cast(Generator[Store, None, None], open_test_store("redis", tmp_path, request))
    shared = next(opened)
    harnesses = [
        cast(AsyncGenerator[Harness, None], make_harness(shared, tmp_path)) for _ in range(2)
    ]
    first, second = [await harness.__anext__() for harness in harnesses]
    try:
        got: dict[str, list[str]] = {"first": [], "second": []}
        first.services.endings.subscribe(lambda e: got["first"].append(e.event.job_id))
        second.services.endings.subscribe(lambda e: got["second"].append(e.event.job_id))
        response = await first.http.post(
            f"/v2/{EDIT}",
            params={"webhook": "https://example.com/hook"},
            json=body_for(EDIT, image=png_b64()),
            headers=first.headers(),
        )
        job_id = response.json()["request_id"]
        media_ids = inputs_of(first, job_id)
        first.claim()
        first.complete(job_id)  # a worker process somewhere
        for node in (first, second):
            settle(node)
            sender = WebhookDispatcher(
                node.store, body_for=body_builder(node.services), clock=node.clock
            )
            sender.follow()
            sender.close()
        assert got == {"first": [job_id], "second": [job_id]}
        assert gone(first, media_ids)
        delivery = shared.get_webhook(job_id)
        assert delivery is not None and delivery.attempts == ()
    finally:
        for node in (first, second):
            node.services.close()
        for harness in harnesses:
            await harness.aclose()
        opened.close()
