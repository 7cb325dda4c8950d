"""Request history and usage in Redis, mixed into ``RedisStore``.

The submit script writes a request's record (``hist:<job_id>``), lists it in the key's
``histkey:<key_id>`` zset (scored by created_at; equal scores in job id order) and counts it in
``usage:<key_id>:<day>``; ``announce`` (``lua/helpers.lua``) updates both in the script of every
transition; ``lua/purge_history.lua`` drops them ``history_ttl_s`` on. These reads need no
script: each record and counter is only ever changed whole, by one script.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar, cast

import redis

from qwenserve.jobs import Job
from qwenserve.store import rules
from qwenserve.store.history import (
    DAY_S,
    HistoryFilter,
    HistoryPage,
    HistoryPolicy,
    HistoryRecord,
    UsageRow,
    day_number,
    day_text,
    decode_cursor,
    encode_cursor,
    prompt_of,
)
from qwenserve.store.redis.client import float_text
from qwenserve.store.redis_keys import RedisKeys

_T = TypeVar("_T")
_BATCH = 200


def _optional_float(text: str | None) -> float | None:
    return float(text) if text else None


def _record(data: dict[str, str]) -> HistoryRecord:
    return HistoryRecord(
        request_id=data["request_id"],
        key_id=data["key_id"],
        slug=data["slug"],
        status=data["status"],
        created_at=float(data["created_at"]),
        finished_at=_optional_float(data.get("finished_at")),
        cost_usd=rules.to_usd(int(data["cost_micro"])),
        inference_time_s=_optional_float(data.get("inference_time_s")),
        error=data.get("error") or None,
        prompt=data.get("prompt"),
    )


def refusal_fields(job: Job, now: float) -> dict[str, str]:
    """The job hash fields of a job the API refused at submit (``lua/submit.lua`` records it
    FAILED, never queued)."""
    return {
        "error": job.error or "",
        "error_kind": job.error_kind or "",
        "finished_at": float_text(now),
    }


class RedisHistory:
    """``Store.history`` and ``Store.usage`` over ``self._redis`` (see the module docstring),
    and the history arguments of the submit script."""

    _redis: redis.Redis
    keys: RedisKeys
    history_policy: HistoryPolicy
    expiry_grace_s: float

    def _run(self, call: Callable[[], _T]) -> _T:
        raise NotImplementedError  # RedisStore's

    def _history_args(self, job: Job, now: float) -> list[str | int]:
        """The submit script's history arguments (see lua/submit.lua): the record's and the
        day counters' expiry (and Redis TTLs past it, relative to ``now`` like the job's)."""
        policy = self.history_policy
        day = day_number(job.created_at)
        record_until = job.created_at + policy.ttl_s
        usage_until = (day + 1) * DAY_S + policy.ttl_s
        prompt = prompt_of(job.request, policy)

        def ttl_ms(until: float) -> int:
            return max(1, math.ceil((until - now + self.expiry_grace_s) * 1000))

        return [
            job.key_id,
            float_text(record_until),
            ttl_ms(record_until),
            day,
            float_text(usage_until),
            ttl_ms(usage_until),
            "1" if prompt is not None else "0",
            prompt or "",
        ]

    def history(
        self,
        key_id: str,
        *,
        limit: int,
        cursor: str | None = None,
        where: HistoryFilter = HistoryFilter(),  # noqa: B008 - frozen
    ) -> HistoryPage:
        after = decode_cursor(cursor) if cursor is not None else None
        top = "+inf"
        if after is not None:
            top = float_text(after[0])
        if where.until is not None and (after is None or where.until <= after[0]):
            top = "(" + float_text(where.until)
        bottom = float_text(where.since) if where.since is not None else "-inf"
        index = self.keys.history_by_key(key_id)
        found: list[HistoryRecord] = []
        offset = 0
        while len(found) <= limit:
            members = self._page_of_index(index, top, bottom, offset)
            if not members:
                break
            offset += len(members)
            # Newest first, equal scores in reverse job id order (as SQLite's ORDER BY): the
            # cursor's own score keeps only the ids below the cursor's.
            ids = [
                job_id
                for job_id, score in members
                if after is None or score < after[0] or job_id < after[1]
            ]
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.keys.history(job_id))
            rows = cast(list[dict[str, str]], self._run(pipe.execute))
            for data in rows:
                if not data:  # purged between the two reads
                    continue
                record = _record(data)
                if where.matches(record):
                    found.append(record)
            if len(members) < _BATCH:
                break
        records = found[:limit]
        more = len(found) > limit
        return HistoryPage(
            records=records,
            next_cursor=encode_cursor(records[-1].created_at, records[-1].request_id)
            if more
            else None,
        )

    def _page_of_index(
        self, index: str, top: str, bottom: str, offset: int
    ) -> list[tuple[str, float]]:
        def read() -> list[tuple[str, float]]:
            return cast(
                list[tuple[str, float]],
                self._redis.zrevrangebyscore(
                    index, top, bottom, start=offset, num=_BATCH, withscores=True
                ),
            )

        return self._run(read)

    def usage(self, key_id: str | None, *, since: float, until: float) -> list[UsageRow]:
        if key_id is not None:
            key_ids = [key_id]
        else:
            everyone = self.keys.all_keys()
            key_ids = sorted(cast(set[str], self._run(lambda: self._redis.smembers(everyone))))
        days = range(day_number(since), day_number(until) + 1)
        pipe = self._redis.pipeline(transaction=False)
        wanted = [(day, key) for day in days for key in key_ids]
        for day, key in wanted:
            pipe.hgetall(self.keys.usage(key, day))
        counters = cast(list[dict[str, str]], self._run(pipe.execute))
        rows: list[UsageRow] = []
        for (day, key), fields in zip(wanted, counters, strict=True):
            slugs = sorted({name.rsplit(":", 1)[0] for name in fields})
            for slug in slugs:
                count = int(fields.get(f"{slug}:count", "0"))
                if count == 0:
                    continue
                rows.append(
                    UsageRow(
                        day=day_text(day),
                        key_id=key,
                        model=slug,
                        count=count,
                        cost_usd=rules.to_usd(int(fields.get(f"{slug}:cost_micro", "0"))),
                        gpu_seconds=int(fields.get(f"{slug}:gpu_ms", "0")) / 1000,
                    )
                )
        return rows
