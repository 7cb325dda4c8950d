"""The Store contract for request history and usage, on every backend (mixed in beside
``StoreContract``; the same ``store`` and ``clock`` fixtures)."""

from __future__ import annotations

import pytest

from qwenserve.errors import InvalidRequest
from qwenserve.store.base import Store
from qwenserve.store.history import DEFAULT_HISTORY_TTL_S, HistoryFilter
from tests.store.contract import TTL_S, Clock, claim_one, make_job, make_key, make_result


class HistoryContract:
    """``Store.history`` and ``Store.usage`` (see ``qwenserve.store.history``)."""

    def test_pages_newest_first_without_gaps_or_repeats(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=100.0)
        submitted = []
        for i in range(23):
            if i % 5 == 0:
                clock.advance(1)  # runs of equal timestamps
            job = make_job(key, clock)
            store.submit(job, rpm=0, now=clock.now)
            submitted.append(job)
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page = store.history(key.id, limit=4, cursor=cursor)
            seen += [r.request_id for r in page.records]
            pages += 1
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert len(seen) == len(set(seen)) == 23
        assert pages == 6
        expected = sorted(submitted, key=lambda j: (j.created_at, j.id), reverse=True)
        assert seen == [j.id for j in expected]

    def test_a_bad_cursor_is_refused(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        with pytest.raises(InvalidRequest) as raised:
            store.history(key.id, limit=5, cursor="!!not-a-cursor")
        assert raised.value.field == "cursor"

    def test_records_follow_the_job_and_the_money(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=10.0)
        done, failed, waiting = (make_job(key, clock, cost_usd=0.25) for _ in range(3))
        for job in (done, failed, waiting):
            store.submit(job, rpm=0, now=clock.now)
            clock.advance(1)
        assert claim_one(store, clock) is not None  # done
        clock.advance(2)
        assert store.complete(done.id, "w1", make_result(), now=clock.now)
        store.fail(failed.id, None, kind="InferenceError", message="boom", now=clock.now)
        records = {r.request_id: r for r in store.history(key.id, limit=10).records}
        assert records[done.id].status == "COMPLETED"
        assert records[done.id].finished_at == clock.now
        assert records[done.id].inference_time_s == pytest.approx(1.25)
        assert records[done.id].cost_usd == pytest.approx(0.25)
        assert records[failed.id].status == "FAILED"
        assert records[failed.id].error == "boom" and records[failed.id].cost_usd == 0
        assert records[waiting.id].status == "QUEUED", records[waiting.id]
        assert records[waiting.id].finished_at is None
        assert records[done.id].prompt is None, "prompts are not kept by default"

    def test_each_filter(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=10.0)
        early = make_job(key, clock, slug="qwen-image")
        store.submit(early, rpm=0, now=clock.now)
        clock.advance(100)
        late = make_job(key, clock, slug="qwen-image-fast")
        store.submit(late, rpm=0, now=clock.now)
        store.fail(late.id, None, kind="cancelled", message="stop", now=clock.now)

        def ids(**where: object) -> list[str]:
            page = store.history(key.id, limit=10, where=HistoryFilter(**where))  # type: ignore[arg-type]
            return [r.request_id for r in page.records]

        assert ids(status="FAILED") == [late.id]
        assert ids(status="QUEUED") == [early.id]
        assert ids(model="qwen-image") == [early.id]
        assert ids(since=clock.now) == [late.id]
        assert ids(until=clock.now) == [early.id]
        assert ids(since=clock.now - 100, until=clock.now + 1) == [late.id, early.id]

    def test_other_keys_records_are_invisible(self, store: Store, clock: Clock) -> None:
        alice, bob = make_key(store, clock), make_key(store, clock)
        store.submit(make_job(alice, clock), rpm=0, now=clock.now)
        assert store.history(bob.id, limit=10).records == []
        assert store.usage(bob.id, since=clock.now - 1, until=clock.now) == []

    def test_history_outlives_the_result_then_goes(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock) is not None
        assert store.complete(job.id, "w1", make_result(), now=clock.now)
        clock.advance(TTL_S + 1)
        store.purge_expired(now=clock.now)
        assert store.get_job(job.id, now=clock.now) is None, "the result expired"
        [record] = store.history(key.id, limit=10).records
        assert record.request_id == job.id and record.status == "COMPLETED"
        clock.advance(DEFAULT_HISTORY_TTL_S)
        store.purge_expired(now=clock.now)
        assert store.history(key.id, limit=10).records == []

    def test_usage_totals_equal_the_charges(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=10.0)
        start = clock.now
        jobs = [make_job(key, clock, cost_usd=0.1) for _ in range(3)]
        for job in jobs:
            store.submit(job, rpm=0, now=clock.now)
        for _ in range(2):
            claimed = claim_one(store, clock)
            assert claimed is not None
            assert store.complete(claimed.id, "w1", make_result(), now=clock.now)
        store.fail(jobs[2].id, None, kind="InferenceError", message="x", now=clock.now)
        clock.advance(86400)
        other_day = make_job(key, clock, slug="qwen-image-fast", cost_usd=0.05)
        store.submit(other_day, rpm=0, now=clock.now)
        rows = store.usage(key.id, since=start, until=clock.now)
        assert [(r.model, r.count) for r in rows] == [("qwen-image", 3), ("qwen-image-fast", 1)]
        assert rows[0].day < rows[1].day
        assert rows[0].cost_usd == pytest.approx(0.2)  # the refunded failure counts 0
        assert rows[0].gpu_seconds == pytest.approx(2.5)
        assert rows[1].cost_usd == pytest.approx(0.05) and rows[1].gpu_seconds == 0
        charged = 10.0 - (store.get_key(key.id).balance_usd)  # type: ignore[union-attr]
        assert sum(r.cost_usd for r in rows) == pytest.approx(charged)
        assert store.usage(key.id, since=clock.now, until=clock.now) == rows[1:]
        assert [r.key_id for r in store.usage(None, since=start, until=clock.now)] == [key.id] * 2
