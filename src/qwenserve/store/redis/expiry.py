"""The Redis store's sweep (``Store.purge_expired``), mixed into ``RedisStore``: every API node
runs it now and then, so it is the one place where time ends things nobody is watching.

A job hash gets a Redis TTL of ``expires_at - now + expiry_grace_s`` (set by the submit script).
Reads hide a job from ``expires_at`` on; the grace keeps it long enough for the sweep to find it
through the ``expiry`` zset, refund it if it never finished (announcing it as failed,
``expired``), remove its stream entry and return it so its media can go. The TTL is relative to
the caller's ``now`` rather than an EXPIREAT, so an injected test clock does not make Redis delete
fresh jobs. If no sweep runs for the whole grace, Redis drops the job itself (its refund is then
lost, and the log keeps its events until a sweep runs). The sweep also ends queued jobs past
their start deadline (refunded), trims the event log and drops expired history, each in batches
of one script call so no call blocks the server for long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import Script

from qwenserve.jobs import Job, JobEvent
from qwenserve.store import rules
from qwenserve.store.base import Purged
from qwenserve.store.records import job_from_record
from qwenserve.store.redis.client import float_text, pairs
from qwenserve.store.redis.scripts import JobScripts, announced
from qwenserve.store.redis_keys import RedisKeys

PURGE_BATCH = 500


class RedisExpiry:
    """``Store.purge_expired`` over the store's keys and script runner."""

    keys: RedisKeys
    _scripts: JobScripts

    def _eval(self, script: Script, keys: Sequence[str], *args: str | int | float) -> Any:
        raise NotImplementedError  # RedisStore's

    def purge_expired(self, *, now: float) -> Purged:
        events: list[JobEvent] = []
        batch = rules.START_TIMEOUT_BATCH
        while True:
            handled, appended = self._eval(
                self._scripts.start_deadlines, [], float_text(now), batch
            )
            events.extend(announced(appended))
            if int(handled) != batch:
                break
        trimmed = PURGE_BATCH
        while trimmed == PURGE_BATCH:
            trimmed = self._eval(self._scripts.trim_events, [], float_text(now), PURGE_BATCH)
        gone = PURGE_BATCH
        while gone >= PURGE_BATCH:
            gone = self._eval(
                self._scripts.purge_history,
                [self.keys.history_expiry(), self.keys.usage_expiry()],
                float_text(now),
                PURGE_BATCH,
            )
        purged: list[Job] = []
        while True:
            jobs, appended = self._eval(
                self._scripts.purge, [self.keys.expiry()], float_text(now), PURGE_BATCH
            )
            purged.extend(job_from_record(pairs(flat)) for flat in jobs)
            events.extend(announced(appended))
            if len(jobs) < PURGE_BATCH:
                return Purged(purged, events)
