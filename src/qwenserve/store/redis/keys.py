"""The Redis store's API keys and credits (``key:<id>`` hashes, ``keyhash:``, ``keys``), each
change one Lua script, mixed into ``RedisStore``. Money is integer micro-USD (``store.rules``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import redis
from redis.commands.core import Script

from qwenserve.store import rules
from qwenserve.store.base import ApiKey, KeyLoad
from qwenserve.store.records import key_from_record
from qwenserve.store.redis.client import float_text
from qwenserve.store.redis.scripts import JobScripts
from qwenserve.store.redis_keys import RedisKeys

_T = TypeVar("_T")


class RedisApiKeys:
    """Key and credit steps over the store's client, keys and script runner."""

    keys: RedisKeys
    _redis: redis.Redis
    _scripts: JobScripts

    def _eval(self, script: Script, keys: Sequence[str], *args: str | int | float) -> Any:
        raise NotImplementedError  # RedisStore's

    def _run(self, call: Callable[[], _T]) -> _T:
        raise NotImplementedError  # RedisStore's

    def _hash(self, key: str) -> dict[str, str]:
        raise NotImplementedError  # RedisStore's

    def _members(self, key: str) -> list[str]:
        raise NotImplementedError  # RedisStore's

    def create_key(self, key: ApiKey) -> None:
        fields = {
            "id": key.id,
            "key_hash": key.key_hash,
            "name": key.name,
            "balance_micro": str(rules.to_micro(key.balance_usd)),
            "rpm": str(key.rpm),
            "models": json.dumps(list(key.models)),
            "created_at": float_text(key.created_at),
            "revoked": "1" if key.revoked else "0",
            "max_queued": str(key.max_queued),
            "weight": float_text(key.weight),
            "max_running": str(key.max_running),
        }
        flat = [part for pair in fields.items() for part in pair]
        created = self._eval(
            self._scripts.create_key,
            [self.keys.api_key(key.id), self.keys.key_by_hash(key.key_hash), self.keys.all_keys()],
            key.id,
            *flat,
        )
        if not created:
            raise rules.duplicate_key(key.id)

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        key_id = self._run(lambda: self._redis.get(self.keys.key_by_hash(key_hash)))
        return self.get_key(cast(str, key_id)) if key_id is not None else None

    def get_key(self, key_id: str) -> ApiKey | None:
        data = self._hash(self.keys.api_key(key_id))
        return key_from_record(data) if data else None

    def list_keys(self) -> list[ApiKey]:
        def read() -> list[dict[str, str]]:
            pipe = self._redis.pipeline(transaction=False)
            for key_id in self._members(self.keys.all_keys()):
                pipe.hgetall(self.keys.api_key(key_id))
            return [data for data in pipe.execute() if data]

        keys = [key_from_record(data) for data in self._run(read)]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    def revoke_key(self, key_id: str) -> bool:
        return bool(self._eval(self._scripts.revoke_key, [self.keys.api_key(key_id)]))

    def topup(self, key_id: str, amount_usd: float) -> float:
        balance = self._eval(
            self._scripts.topup, [self.keys.api_key(key_id)], rules.to_micro(amount_usd)
        )
        if balance is None:
            raise KeyError(key_id)
        return rules.to_usd(int(balance))

    def key_loads(self) -> list[KeyLoad]:
        # The sets the queue limits keep (keyqueued:<id>, running:<id>): one pipelined SCARD
        # pair and name per key.
        def read() -> list[KeyLoad]:
            ids = sorted(self._members(self.keys.all_keys()))
            pipe = self._redis.pipeline(transaction=False)
            for key_id in ids:
                pipe.scard(self.keys.key_queued(key_id))
                pipe.scard(self.keys.running(key_id))
                pipe.hget(self.keys.api_key(key_id), "name")
            answers = pipe.execute()
            loads = []
            for index, key_id in enumerate(ids):
                queued, running, name = answers[3 * index : 3 * index + 3]
                if int(queued) or int(running):
                    loads.append(KeyLoad(key_id, str(name or ""), int(queued), int(running)))
            return loads

        return self._run(read)

    def update_key(
        self,
        key_id: str,
        *,
        rpm: int | None = None,
        max_queued: int | None = None,
        weight: float | None = None,
        max_running: int | None = None,
        balance_usd: float | None = None,
    ) -> ApiKey | None:
        # Every field in one HSET of one script: a balance set alongside limits is one step.
        changes = {
            "rpm": rpm,
            "max_queued": max_queued,
            "weight": float_text(weight) if weight is not None else None,
            "max_running": max_running,
            "balance_micro": rules.to_micro(balance_usd) if balance_usd is not None else None,
        }
        flat = [str(part) for name, v in changes.items() if v is not None for part in (name, v)]
        if not self._eval(self._scripts.update_key, [self.keys.api_key(key_id)], *flat):
            return None
        return self.get_key(key_id)
