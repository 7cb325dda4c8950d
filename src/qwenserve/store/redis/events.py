"""Reading the Redis store's event log, mixed into ``RedisStore``.

Every script that changes a job's status XADDs one entry to the ``events`` stream (and, under the
same id, to ``jobevents:<id>``, so one job's events are read without scanning the log), in the
same script as the change: the log cannot miss or invent a transition. Each event is also listed
in ``events:trim``, scored by when it may go (its ``at`` plus the job's result TTL), where
purge_expired finds and XDELs it. Stream ids are the event ids. The reads here need no script:
an entry is only ever appended whole, by one script.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar, cast

import redis

from qwenserve.jobs import JobEvent
from qwenserve.store import rules
from qwenserve.store.records import event_from_record
from qwenserve.store.redis_keys import RedisKeys

_T = TypeVar("_T")
_STREAM_ID = re.compile(r"^\d+-\d+$")


def _range_start(after: str | None) -> str:
    """The XRANGE start for "after event id ``after``"."""
    if after is None:
        return "-"
    if not _STREAM_ID.match(after):
        raise rules.invalid_event_id(after)
    return f"({after}"


def _events(entries: Sequence[tuple[str, Mapping[str, str]]]) -> list[JobEvent]:
    return [event_from_record(entry_id, fields) for entry_id, fields in entries]


class RedisEventLog:
    """``Store.events``, ``job_events`` and ``last_event_id`` over the store's client."""

    keys: RedisKeys
    _redis: redis.Redis

    def _run(self, call: Callable[[], _T]) -> _T:
        raise NotImplementedError  # RedisStore's

    def events(self, *, after: str | None = None, limit: int = 100) -> list[JobEvent]:
        start = _range_start(after)
        entries = self._run(lambda: self._redis.xrange(self.keys.events(), start, "+", limit))
        return _events(cast(list[tuple[str, dict[str, str]]], entries))

    def job_events(self, job_id: str, *, after: str | None = None) -> list[JobEvent]:
        start = _range_start(after)
        entries = self._run(lambda: self._redis.xrange(self.keys.job_events(job_id), start, "+"))
        return _events(cast(list[tuple[str, dict[str, str]]], entries))

    def last_event_id(self) -> str | None:
        newest = self._run(lambda: self._redis.xrevrange(self.keys.events(), "+", "-", 1))
        entries = cast(list[tuple[str, dict[str, str]]], newest)
        return entries[0][0] if entries else None
