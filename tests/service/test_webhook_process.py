"""Webhooks through a real `qwenserve serve` process: a kill -9 between a job's ending and its
delivery loses nothing, and `qwenserve keys webhook-secret` shows and rotates the signing secret."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.processes import Server, free_port
from tests.redis_server import RedisServer, needs_redis
from tests.service.helpers import body_for
from tests.service.test_webhooks import Receiver

FAST_RETRIES = {
    "QWENSERVE_ALLOW_PRIVATE_URLS": "true",  # the receivers are on loopback
    "QWENSERVE_WEBHOOK_BACKOFF_S": "0.5",
    "QWENSERVE_WEBHOOK_MAX_BACKOFF_S": "1",
    "QWENSERVE_WEBHOOK_POLL_S": "0.2",
}


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """`qwenserve ARGS` against ``server``'s store (whatever the exit status)."""
    return subprocess.run(
        [sys.executable, "-m", "qwenserve.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=server.env,
        check=False,
    )


def create_key(server: Server) -> tuple[str, str, str]:
    """A new key: its plaintext, its id and the signing secret `keys create` showed."""
    created = cli(server, "keys", "create", "--credits", "10", "--rpm", "0")
    assert created.returncode == 0, created.stderr
    key_id = re.search(r"key_[0-9a-f]{12}", created.stderr)
    secret = re.search(r"whsec_[A-Za-z0-9+/=]+", created.stderr)
    assert key_id and secret, created.stderr
    return created.stdout.strip().splitlines()[-1], key_id.group(), secret.group()


def submit(server: Server, key: str, hook: str, seed: int = 0) -> str:
    response = httpx.post(
        f"{server.url}/v2/qwen-image-fast",
        params={"webhook": hook},
        headers={"x-api-key": key},
        json=body_for("qwen-image-fast", seed=seed),
    )
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def result(server: Server, key: str, request_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v2/requests/{request_id}", headers={"x-api-key": key})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for(what: Callable[[], bool], timeout_s: float, server: Server) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s:\n{server.logs()[-4000:]}")
        time.sleep(0.1)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    opened: list[Receiver] = []
    yield opened
    for receiver in opened:
        receiver.close()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=[pytest.mark.redis, needs_redis])])
def store_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The server's store: the data dir's SQLite file, or a real redis-server."""
    if request.param == "sqlite":
        yield {}
        return
    with RedisServer() as redis_server:
        yield {"QWENSERVE_STORE": redis_server.url}


def test_kill_minus_nine_between_ending_and_delivery(
    store_env: dict[str, str],  # first: the redis-server outlives the servers
    make_server: Callable[..., Server],
    receivers: list[Receiver],
) -> None:
    """Endings not yet delivered when the server dies: one whose receiver is down (its first
    attempts fail and are retried later) and, on SQLite, one whose receiver is slow (the server
    dies mid-attempt, holding its lease; on Redis another node may be sending it, so its lease
    is waited out). The restarted server delivers them, signed, once each."""
    embedded = not store_env
    env = {**FAST_RETRIES, **store_env, "QWENSERVE_WEBHOOK_TIMEOUT_S": "30"}
    server = make_server(env=env)
    server.start()
    key, key_id, _ = create_key(server)
    down_port = free_port()
    down_id = submit(server, key, f"http://127.0.0.1:{down_port}/hook", seed=1)
    ids = [down_id]
    slow = Receiver(script=[60.0])  # answers the first POST only after the kill
    receivers.append(slow)
    if embedded:
        ids.append(submit(server, key, slow.url, seed=2))

    def down_failed_once() -> bool:
        return bool(result(server, key, down_id).get("webhook", {}).get("attempts"))

    wait_for(down_failed_once, 120, server)
    if embedded:
        wait_for(lambda: len(slow.got) == 1, 120, server)
    for request_id in ids:
        body = result(server, key, request_id)
        assert body["status"] == "COMPLETED" and body["webhook"]["status"] == "pending"
    server.kill()

    up = Receiver(port=down_port)
    receivers.append(up)
    server.start()
    healthy_at = time.time()

    def delivered() -> bool:
        return all(result(server, key, i)["webhook"]["status"] == "delivered" for i in ids)

    wait_for(delivered, 60, server)
    secret = cli(server, "keys", "webhook-secret", key_id).stdout.strip()
    assert secret.startswith("whsec_")
    for request_id, receiver in zip(ids, (up, slow), strict=False):
        ended = result(server, key, request_id)
        webhook = ended.pop("webhook")
        successes = [a for a in webhook["attempts"] if a.get("status_code") == 200]
        assert len(successes) == 1, webhook
        # Sent as soon as the server was back, not after the dead server's lease (60 s from
        # its claim) ran out.
        assert successes[0]["at"] - healthy_at < 10, (webhook, healthy_at)
        headers, body = receiver.got[-1]
        assert Webhook(secret).verify(body, headers) == ended
        # Every attempt of one ending carries the same webhook-id (receivers dedupe on it).
        assert len({h["webhook-id"] for h, _ in receiver.got}) == 1
    assert len(up.got) == 1
    if embedded:
        assert len(slow.got) == 2  # the one cut by the kill, then the retry


def test_keys_webhook_secret_shows_and_rotates(server: Server, receivers: list[Receiver]) -> None:
    key, key_id, created_secret = create_key(server)
    shown = cli(server, "keys", "webhook-secret", key_id)
    assert shown.returncode == 0 and shown.stdout.strip() == created_secret
    assert created_secret.startswith("whsec_")

    rotated = cli(server, "keys", "webhook-secret", key_id, "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = rotated.stdout.strip()
    assert new_secret.startswith("whsec_") and new_secret != created_secret
    again = cli(server, "keys", "webhook-secret", key_id)
    assert again.stdout.strip() == new_secret

    receiver = Receiver()
    receivers.append(receiver)
    request_id = submit(server, key, receiver.url)

    def delivered() -> bool:
        return bool(result(server, key, request_id)["webhook"]["status"] == "delivered")

    wait_for(delivered, 120, server)
    [(headers, body)] = receiver.got
    ended = result(server, key, request_id)
    ended.pop("webhook")
    assert Webhook(new_secret).verify(body, headers) == ended
    with pytest.raises(WebhookVerificationError):
        Webhook(created_secret).verify(body, headers)

    unknown = cli(server, "keys", "webhook-secret", "key_000000000000")
    assert unknown.returncode != 0 and unknown.stdout == ""
    assert "no key key_000000000000" in unknown.stderr
    unknown_rotate = cli(server, "keys", "webhook-secret", "key_000000000000", "--rotate")
    assert unknown_rotate.returncode != 0 and "no key" in unknown_rotate.stderr
