"""Webhooks end to end over the in-process API and a real receiving HTTP server on loopback:
signed per Standard Webhooks, the body of GET /v2/requests/{id}, retried on 5xx and timeouts,
stopped by other 4xx, refused for private addresses, one delivery with two dispatchers."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from qwenserve.accounts.keys import webhook_secret
from qwenserve.api.webhooks import body_builder
from qwenserve.media.fetch import IPAddress
from qwenserve.notify.webhooks import WebhookDispatcher, WebhookPolicy
from qwenserve.store.base import Store
from tests.service.helpers import body_for
from tests.service.inprocess import Harness, make_harness, open_test_store


class Receiver:
    """A threaded HTTP server answering each POST with the next scripted status (a float:
    sleep that long first, then 200; a callable: call it, then 200; ``"drip"``: the status
    line, then a header one byte every 0.2 s for 10 s), recording what it got; on ``port``
    (0: a free one)."""

    def __init__(
        self, script: list[int | float | str | Callable[[], None]] | None = None, port: int = 0
    ) -> None:
        self.script = list(script or [])
        self.got: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                step = receiver.script.pop(0) if receiver.script else 200
                if step == "drip":
                    try:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                        for _ in range(50):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:  # the sender gave up: what this test wants
                        pass
                    return
                if callable(step):
                    step()
                    step = 200
                if isinstance(step, float):
                    time.sleep(step)
                    step = 200
                self.send_response(int(step))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?x=1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def loopback_only(address: IPAddress) -> bool:
    return address == ipaddress.ip_address("127.0.0.1")


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    # Submits may name loopback here; deliveries are checked by the dispatcher's own policy.
    async for harness in make_harness(
        store, tmp_path, allow_private_urls=True, public_url="http://api.test"
    ):
        yield harness


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def dispatcher(api: Harness, **policy: Any) -> WebhookDispatcher:
    return WebhookDispatcher(
        api.store,
        body_for=body_builder(api.services),
        policy=WebhookPolicy(**{"backoff_s": 10.0, "timeout_s": 2.0, **policy}),
        clock=api.clock,
        address_policy=loopback_only,
    )


async def ended_job(api: Harness, url: str) -> str:
    response = await api.http.post(
        "/v2/qwen-image-fast",
        params={"webhook": url},
        json=body_for("qwen-image-fast"),
        headers=api.headers(),
    )
    assert response.status_code == 200, response.text
    job_id: str = response.json()["request_id"]
    api.claim()
    api.complete(job_id)
    return job_id


async def result(api: Harness, job_id: str) -> dict[str, Any]:
    response = await api.http.get(f"/v2/requests/{job_id}", headers=api.headers())
    body: dict[str, Any] = response.json()
    return body


async def test_delivery_is_signed_and_is_the_result_body(api: Harness, receiver: Receiver) -> None:
    job_id = await ended_job(api, receiver.url)
    before = await result(api, job_id)
    assert before["webhook"] == {
        "url": receiver.url,
        "status": "pending",
        "attempts": [],
        "next_retry_at": None,
    }
    sender = dispatcher(api)
    try:
        assert await asyncio.to_thread(sender.round) == 1
        assert await asyncio.to_thread(sender.round) == 0  # delivered once
    finally:
        sender.close()
    [(headers, body)] = receiver.got
    secret = webhook_secret(api.store, api.key_id)
    assert secret is not None and secret.startswith("whsec_")
    sent = Webhook(secret).verify(body, headers)
    after = await result(api, job_id)
    webhook = after.pop("webhook")
    assert sent == after
    assert sent["status"] == "COMPLETED" and sent["output"].startswith("http://api.test/media/")
    assert webhook["status"] == "delivered" and webhook["next_retry_at"] is None
    assert [a["status_code"] for a in webhook["attempts"]] == [200]
    events = api.store.job_events(job_id)
    assert headers["webhook-id"] == events[-1].id
    status = (await api.status(job_id)).json()
    assert status["webhook"] == webhook


async def test_retries_after_500_and_a_timeout_with_the_same_id(
    api: Harness, receiver: Receiver
) -> None:
    receiver.script = [500, 1.5, 200]
    job_id = await ended_job(api, receiver.url)
    sender = dispatcher(api, timeout_s=0.5)
    try:
        await asyncio.to_thread(sender.round)
        pending = (await result(api, job_id))["webhook"]
        assert pending["status"] == "pending" and pending["attempts"][0]["status_code"] == 500
        assert api.clock.now + 5 <= pending["next_retry_at"] <= api.clock.now + 10
        assert await asyncio.to_thread(sender.round) == 0  # not due yet
        api.clock.advance(10)
        await asyncio.to_thread(sender.round)
        timed_out = (await result(api, job_id))["webhook"]
        assert timed_out["attempts"][1] == {"at": api.clock.now, "error": "timed out"}
        assert timed_out["next_retry_at"] >= api.clock.now + 10  # doubled
        api.clock.advance(20)
        await asyncio.to_thread(sender.round)
    finally:
        sender.close()
    done = (await result(api, job_id))["webhook"]
    assert done["status"] == "delivered" and len(done["attempts"]) == 3
    assert len({headers["webhook-id"] for headers, _ in receiver.got}) == 1
    assert len({body for _, body in receiver.got}) == 1


async def test_a_retry_after_rotation_is_signed_with_the_new_secret(
    api: Harness, receiver: Receiver
) -> None:
    receiver.script = [503, 200]
    job_id = await ended_job(api, receiver.url)
    old = webhook_secret(api.store, api.key_id)
    sender = dispatcher(api)
    try:
        await asyncio.to_thread(sender.round)
        new = webhook_secret(api.store, api.key_id, rotate=True)
        api.clock.advance(10)
        await asyncio.to_thread(sender.round)
    finally:
        sender.close()
    assert old is not None and new is not None and new != old
    (first_headers, first_body), (headers, body) = receiver.got
    assert first_body == body and first_headers["webhook-id"] == headers["webhook-id"]
    Webhook(old).verify(first_body, first_headers)
    assert Webhook(new).verify(body, headers)["request_id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, headers)
    assert (await result(api, job_id))["webhook"]["status"] == "delivered"


async def test_a_receiver_dripping_its_headers_is_cut_at_the_deadline(
    api: Harness, receiver: Receiver
) -> None:
    receiver.script = ["drip"]
    job_id = await ended_job(api, receiver.url)
    sender = dispatcher(api, timeout_s=1.0)
    try:
        started = time.monotonic()
        await asyncio.to_thread(sender.round)
        elapsed_s = time.monotonic() - started
    finally:
        sender.close()
    # Every read is quick (a byte every 0.2 s), so only a deadline over the whole exchange
    # stops it; without one the attempt would take the 10 s of the drip.
    assert elapsed_s < 5, elapsed_s
    attempt = (await result(api, job_id))["webhook"]["attempts"][0]
    assert attempt["error"] == "timed out"


async def test_the_lease_covers_every_attempt_of_a_claim(api: Harness, receiver: Receiver) -> None:
    """Slow receivers (each within the timeout): while this dispatcher is still sending the
    deliveries it claimed, none of them may be taken by another node (it would send it too)."""
    taken: list[int] = []

    def slow_answer() -> None:
        api.clock.advance(31)  # under the 40 s timeout, past a 60 s lease by the third
        taken.append(len(api.store.claim_webhooks("other-node", lease_s=60, now=api.clock.now)))

    receiver.script = [slow_answer, slow_answer, slow_answer]
    ids = [await ended_job(api, receiver.url) for _ in range(3)]
    sender = WebhookDispatcher(
        api.store,
        body_for=body_builder(api.services),
        policy=WebhookPolicy(timeout_s=40.0),
        clock=api.clock,
        address_policy=loopback_only,
        concurrency=1,
    )
    try:
        assert await asyncio.to_thread(sender.round) == 3
    finally:
        sender.close()
    assert taken == [0, 0, 0]
    assert len(receiver.got) == 3
    for job_id in ids:
        assert (await result(api, job_id))["webhook"]["status"] == "delivered"


async def test_410_stops_it(api: Harness, receiver: Receiver) -> None:
    receiver.script = [410]
    job_id = await ended_job(api, receiver.url)
    sender = dispatcher(api)
    try:
        await asyncio.to_thread(sender.round)
        api.clock.advance(600)  # past any retry it would have had
        assert await asyncio.to_thread(sender.round) == 0
    finally:
        sender.close()
    webhook = (await result(api, job_id))["webhook"]
    assert webhook["status"] == "failed" and webhook["attempts"][0]["status_code"] == 410
    assert len(receiver.got) == 1


async def test_private_address_refused_at_delivery(api: Harness, receiver: Receiver) -> None:
    job_id = await ended_job(api, receiver.url)
    sender = WebhookDispatcher(api.store, body_for=body_builder(api.services), clock=api.clock)
    try:
        await asyncio.to_thread(sender.round)
    finally:
        sender.close()
    webhook = (await result(api, job_id))["webhook"]
    assert webhook["status"] == "failed" and "private" in webhook["attempts"][0]["error"]
    assert receiver.got == []


async def test_two_dispatchers_deliver_once(api: Harness, receiver: Receiver) -> None:
    receiver.script = [0.3]
    ids = [await ended_job(api, receiver.url) for _ in range(3)]
    first, second = dispatcher(api), dispatcher(api)
    try:
        await asyncio.gather(asyncio.to_thread(first.round), asyncio.to_thread(second.round))
    finally:
        first.close()
        second.close()
    assert sorted(json.loads(body)["request_id"] for _, body in receiver.got) == sorted(ids)


async def test_submit_refuses_bad_webhooks(store: Store, tmp_path: Path) -> None:
    async for api in make_harness(store, tmp_path):
        for url in (
            "http://127.0.0.1/x",
            "http://localhost/x",
            "ftp://example.com/x",
            "https://example.com/" + "a" * 2048,
        ):
            response = await api.http.post(
                "/v2/qwen-image-fast",
                params={"webhook": url},
                json=body_for("qwen-image-fast"),
                headers=api.headers(),
            )
            assert response.status_code == 400, url
            assert "webhook" in response.json()["error"], url
        v1 = await api.http.post(
            "/v1/qwen-image-fast",
            params={"webhook": "https://example.com/x"},
            json=body_for("qwen-image-fast"),
            headers=api.headers(),
        )
        assert v1.status_code == 400 and "webhook" in v1.json()["error"]
        assert await api.credits() == 10.0
