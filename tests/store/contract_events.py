"""The Store contract for transitions' returns: each returns exactly the events it appended to
the log (its caller may act on its own ending at once), for every kind of transition and
ending. Every backend.

Mixed into each backend's contract class beside ``StoreContract`` (same ``store`` and ``clock``
fixtures).
"""

from __future__ import annotations

import dataclasses

from qwenserve.jobs import CANCELLED, EXPIRED, JobEvent, JobEventType, JobStatus
from qwenserve.store import rules
from qwenserve.store.base import Store
from tests.store.contract import Clock, claim_one, make_job, make_key, make_result


def _appended(store: Store, before: str | None) -> list[JobEvent]:
    appended: list[JobEvent] = store.events(after=before, limit=1000)
    return appended


def _kinds(events: tuple[JobEvent, ...] | list[JobEvent]) -> list[tuple[str, str | None]]:
    return [(e.type.value, e.error_kind) for e in events]


class EventsContract:
    """What submit, claim, release, complete, fail, cancel and purge_expired return."""

    def test_submit_complete_fail_release_return_their_event(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        mark = store.last_event_id()
        outcome = store.submit(job, rpm=0, now=clock.now)
        assert outcome.event is not None and outcome.event.type is JobEventType.QUEUED
        assert [outcome.event] == _appended(store, mark)

        mark = store.last_event_id()
        claimed = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert [j.id for j in claimed] == [job.id]
        assert _kinds(claimed.events) == [("processing", None)]
        assert list(claimed.events) == _appended(store, mark)

        mark = store.last_event_id()
        released = store.release(job.id, "w1", now=clock.now)
        assert released is not None and released.type is JobEventType.QUEUED
        assert [released] == _appended(store, mark)
        assert store.release(job.id, "w1", now=clock.now) is None, "not held: nothing appended"

        claim_one(store, clock, "w1")
        mark = store.last_event_id()
        completed = store.complete(job.id, "w1", make_result(), now=clock.now)
        assert completed is not None and completed.type is JobEventType.COMPLETED
        assert completed.job_id == job.id and completed.slug == job.slug
        assert [completed] == _appended(store, mark)
        assert store.complete(job.id, "w1", make_result(), now=clock.now) is None

        other = make_job(key, clock)
        store.submit(other, rpm=0, now=clock.now)
        mark = store.last_event_id()
        failed = store.fail(other.id, None, kind="InferenceError", message="boom", now=clock.now)
        assert failed is not None and _kinds([failed]) == [("failed", "InferenceError")]
        assert failed.error == "boom" and [failed] == _appended(store, mark)
        assert store.fail(other.id, None, kind="x", message="y", now=clock.now) is None
        assert _appended(store, failed.id) == []

    def test_a_refused_submit_returns_its_failed_ending(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = dataclasses.replace(
            make_job(key, clock, cost_usd=0.0),
            status=JobStatus.FAILED,
            error="blocked",
            error_kind="content_policy",
            finished_at=clock.now,
        )
        outcome = store.submit(job, rpm=0, now=clock.now)
        assert outcome.event is not None
        assert _kinds([outcome.event]) == [("failed", "content_policy")]

    def test_cancel_returns_the_request_and_the_ending(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        queued = make_job(key, clock)
        store.submit(queued, rpm=0, now=clock.now)
        mark = store.last_event_id()
        cancelled = store.cancel(queued.id, key.id, now=clock.now)
        assert cancelled.job.status is JobStatus.FAILED
        assert _kinds(cancelled.events) == [("failed", CANCELLED)]
        assert list(cancelled.events) == _appended(store, mark)

        running = make_job(key, clock)
        store.submit(running, rpm=0, now=clock.now)
        claim_one(store, clock, "w1", lease_s=10)
        mark = store.last_event_id()
        asked = store.cancel(running.id, key.id, now=clock.now)
        assert asked.job.status is JobStatus.PROCESSING
        assert _kinds(asked.events) == [("cancel_requested", None)]
        assert list(asked.events) == _appended(store, mark)
        assert store.cancel(running.id, key.id, now=clock.now).events == (), "asked again"
        clock.advance(11)  # its worker is gone: asking now ends it
        mark = store.last_event_id()
        lost = store.cancel(running.id, key.id, now=clock.now)
        assert _kinds(lost.events) == [("failed", CANCELLED)]
        assert list(lost.events) == _appended(store, mark)

    def test_claim_returns_give_ups_and_missed_starts(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        tired = make_job(key, clock)
        store.submit(tired, rpm=0, now=clock.now)
        claim_one(store, clock, "w1", lease_s=10, max_attempts=1)
        late = dataclasses.replace(make_job(key, clock), start_by=clock.now + 5)
        store.submit(late, rpm=0, now=clock.now)
        clock.advance(11)
        mark = store.last_event_id()
        claimed = store.claim("w2", slugs=None, lease_s=10, max_attempts=1, now=clock.now)
        assert list(claimed) == []
        assert sorted(_kinds(claimed.events)) == [
            ("failed", rules.GIVE_UP_KIND),
            ("failed", rules.START_TIMEOUT_KIND),
        ]
        assert list(claimed.events) == _appended(store, mark)

    def test_purge_returns_the_expired_endings(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        waiting = make_job(key, clock, ttl_s=60)
        store.submit(waiting, rpm=0, now=clock.now)
        late = dataclasses.replace(make_job(key, clock), start_by=clock.now + 5)
        store.submit(late, rpm=0, now=clock.now)
        clock.advance(61)
        mark = store.last_event_id()
        purged = store.purge_expired(now=clock.now)
        assert [j.id for j in purged] == [waiting.id]
        assert sorted(_kinds(purged.events)) == [
            ("failed", EXPIRED),
            ("failed", rules.START_TIMEOUT_KIND),
        ]
        assert sorted(e.id for e in purged.events) == sorted(e.id for e in _appended(store, mark))
