"""The Redis store's webhook deliveries: a hash per delivery (``webhook:<job_id>``), a due zset
and the dispatchers' log cursor (``redis_keys``), each step one Lua script (``lua/webhook_*``),
mixed into ``RedisStore``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
from redis.commands.core import Script

from qwenserve.jobs import JobEvent
from qwenserve.store.redis.client import float_text, pairs
from qwenserve.store.redis.scripts import LUA_CONSTANTS, source
from qwenserve.store.redis_keys import LUA_KEY_FUNCTIONS, RedisKeys
from qwenserve.store.webhooks import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    delivery_from_record,
)

DELIVERY_RETENTION_S = 26 * 3600.0
"""A delivery record is kept this long after its job ended (past the 24 h of retries)."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class WebhookScripts:
    secret: Script
    enqueue: Script
    claim: Script
    attempt: Script
    release: Script


class RedisWebhooks:
    """Webhook steps over the store's client, keys and script runner."""

    keys: RedisKeys
    _redis: redis.Redis
    _webhook_scripts: WebhookScripts

    def _eval(self, script: Script, keys: Sequence[str], *args: str | int | float) -> Any:
        raise NotImplementedError  # RedisStore's

    def _run(self, call: Callable[[], _T]) -> _T:
        raise NotImplementedError  # RedisStore's

    @staticmethod
    def webhook_scripts(client: redis.Redis) -> WebhookScripts:
        prelude = LUA_KEY_FUNCTIONS + LUA_CONSTANTS

        def script(name: str) -> Script:
            return client.register_script(prelude + source(name))

        return WebhookScripts(
            secret=script("webhook_secret"),
            enqueue=script("webhook_enqueue"),
            claim=script("webhook_claim"),
            attempt=script("webhook_attempt"),
            release=script("webhook_release"),
        )

    def webhook_secret(self, key_id: str, *, candidate: str, rotate: bool = False) -> str | None:
        secret = self._eval(
            self._webhook_scripts.secret,
            [self.keys.api_key(key_id)],
            candidate,
            "1" if rotate else "0",
        )
        return str(secret) if secret is not None else None

    def webhook_cursor(self) -> str | None:
        cursor = self._run(lambda: self._redis.get(self.keys.webhooks_cursor()))
        return cast(str, cursor) if cursor else None

    def enqueue_webhooks(self, events: Sequence[JobEvent], *, cursor: str, now: float) -> int:
        ended = [part for e in events if e.type.is_terminal for part in (e.job_id, e.id)]
        return int(
            self._eval(
                self._webhook_scripts.enqueue,
                [self.keys.webhooks_due(), self.keys.webhooks_cursor()],
                float_text(now),
                math.ceil(DELIVERY_RETENTION_S * 1000),
                cursor,
                *ended,
            )
        )

    def claim_webhooks(
        self, owner: str, *, lease_s: float, now: float, limit: int = 10
    ) -> list[WebhookDelivery]:
        reply = self._eval(
            self._webhook_scripts.claim,
            [self.keys.webhooks_due()],
            float_text(now),
            float_text(now + lease_s),
            owner,
            limit,
        )
        return [delivery_from_record(pairs(flat)) for flat in reply]

    def release_webhook_leases(self, *, now: float) -> int:
        return int(
            self._eval(self._webhook_scripts.release, [self.keys.webhooks_due()], float_text(now))
        )

    def record_webhook_attempt(
        self,
        job_id: str,
        owner: str,
        attempt: WebhookAttempt,
        *,
        status: DeliveryStatus,
        next_attempt_at: float | None,
        body: str,
        now: float,
    ) -> bool:
        return bool(
            self._eval(
                self._webhook_scripts.attempt,
                [self.keys.webhook(job_id), self.keys.webhooks_due()],
                job_id,
                owner,
                status.value,
                json.dumps(attempt.to_dict()),
                float_text(next_attempt_at) if next_attempt_at is not None else "",
                body,
            )
        )

    def get_webhook(self, job_id: str) -> WebhookDelivery | None:
        data = cast(
            dict[str, str], self._run(lambda: self._redis.hgetall(self.keys.webhook(job_id)))
        )
        return delivery_from_record(data) if data else None
