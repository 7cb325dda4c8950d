"""The SQLite store: the shared contract, plus what only a file on disk can promise."""

from __future__ import annotations

import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenserve.catalog import OutputSize, SizeKind
from qwenserve.errors import (
    KeyQueueFull,
    QueueFull,
    QwenServeError,
    ServiceUnavailable,
    Unauthenticated,
)
from qwenserve.jobs import CANCELLED, JobEventType, JobResult, JobStatus, Progress
from qwenserve.store.sqlite import SCHEMA_VERSION, SqliteStore, schema
from tests.store.contract import Clock, StoreContract, make_job, make_key, make_result
from tests.store.contract_backpressure import BackpressureContract
from tests.store.contract_events import EventsContract
from tests.store.contract_fairness import FairnessContract, FairPositionContract
from tests.store.contract_history import HistoryContract
from tests.store.contract_idempotency import IdempotencyContract
from tests.store.contract_policy import PolicyContract
from tests.store.schema_v1 import V1_RESULT, make_v1_database


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "qwenserve.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(db_path)
    yield opened
    opened.close()


class TestSqliteStore(
    StoreContract,
    IdempotencyContract,
    HistoryContract,
    PolicyContract,
    BackpressureContract,
    FairnessContract,
    FairPositionContract,
    EventsContract,
):
    """Every contract test, against a fresh database file."""


def test_data_survives_close_and_reopen(db_path: Path, clock: Clock) -> None:
    first = SqliteStore(db_path)
    key = make_key(first, clock, balance_usd=2.0, rpm=5, models=("qwen-image",))
    done = make_job(key, clock, cost_usd=0.5)
    waiting = make_job(key, clock, cost_usd=0.25)
    first.submit(done, rpm=5, now=clock.now)
    first.submit(waiting, rpm=5, now=clock.now)
    assert first.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
    assert first.complete(done.id, "w1", make_result(9), now=clock.now)
    first.close()

    second = SqliteStore(db_path)
    try:
        assert second.get_key(key.id) == dataclasses.replace(key, balance_usd=1.25)
        got = second.get_job(done.id, now=clock.now)
        assert got is not None
        assert got.status is JobStatus.COMPLETED and got.result == make_result(9)
        queued = second.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert [j.id for j in queued] == [waiting.id]
        # the rate-limit window survives too: 2 of 5 were used in this minute
        outcome = second.submit(make_job(key, clock, cost_usd=0.0), rpm=5, now=clock.now)
        assert outcome.rate_limit_remaining == 2
    finally:
        second.close()


def test_file_is_in_wal_mode_with_one_schema_version(db_path: Path) -> None:
    SqliteStore(db_path).close()
    SqliteStore(db_path).close()  # opening again must not re-create or duplicate anything
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        indexes = {
            row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
        assert {"jobs_claim", "jobs_expiry"} <= indexes
    finally:
        raw.close()


def _columns(path: Path, table: str) -> set[str]:
    raw = sqlite3.connect(path)
    try:
        return {row[1] for row in raw.execute(f"PRAGMA table_info({table})")}
    finally:
        raw.close()


def _version(path: Path) -> list[tuple[int]]:
    raw = sqlite3.connect(path)
    try:
        return raw.execute("SELECT version FROM schema_version").fetchall()
    finally:
        raw.close()


def test_a_v1_data_dir_is_upgraded_and_loses_nothing(db_path: Path, clock: Clock) -> None:
    v1 = make_v1_database(db_path, now=clock.now)
    assert "extra" in _columns(db_path, "jobs")
    store = SqliteStore(db_path)
    try:
        assert _version(db_path) == [(SCHEMA_VERSION,)]
        columns = _columns(db_path, "jobs")
        assert {"progress_step", "progress_total", "progress_at", "cancel_requested_at"} <= columns
        assert "extra" not in columns
        key = store.key_by_hash(v1.key_hash)
        assert key is not None and key.id == v1.key_id
        assert key.balance_usd == pytest.approx(9.0) and key.rpm == 10
        assert key.models == ("qwen-image",)
        jobs = {job_id: store.get_job(job_id, now=clock.now) for job_id in vars(v1).values()}
        got = {job_id: job.status for job_id, job in jobs.items() if job is not None}
        assert got == {
            v1.queued: JobStatus.QUEUED,
            v1.queued_other_model: JobStatus.QUEUED,
            v1.processing: JobStatus.PROCESSING,
            v1.completed: JobStatus.COMPLETED,
            v1.failed: JobStatus.FAILED,
        }
        completed = jobs[v1.completed]
        assert completed is not None and completed.result == JobResult.from_dict(V1_RESULT)
        failed = jobs[v1.failed]
        assert failed is not None and (failed.error, failed.error_kind) == (
            "boom",
            "InferenceError",
        )
        running = jobs[v1.processing]
        assert running is not None and running.worker_id == "w-old" and running.progress is None
        history = {r.request_id: r for r in store.history(v1.key_id, limit=10).records}
        assert {i: r.status for i, r in history.items()} == {i: s.value for i, s in got.items()}
        assert history[v1.failed].cost_usd == 0 and history[v1.failed].error == "boom"
        assert history[v1.completed].inference_time_s == V1_RESULT["inference_time_s"]
        # a v1 record's request loads typed, its size fixed now from its fields (no size then)
        assert (running.request.prompt, running.request.seed) == ("job 2", 2)
        assert running.size == OutputSize(SizeKind.RATIO, 1104 * 1472, 1104, 1472)
        # the rate window the old release opened carries on: 4 of 10 used
        outcome = store.submit(make_job(key, clock, cost_usd=0.0), rpm=10, now=clock.now)
        assert outcome.rate_limit_remaining == 5
        # queue order and positions across models, then the old jobs run and end as new ones do
        assert store.queue_position(v1.queued, now=clock.now) == 0
        assert store.queue_position(v1.queued_other_model, now=clock.now) == 0
        store.cancel(v1.queued_other_model, key.id, now=clock.now)
        claimed = store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert [j.id for j in claimed] == [v1.queued]
        beat = store.heartbeat("w-old", {v1.processing: Progress(1, 4)}, lease_s=30, now=clock.now)
        assert beat.owned == {v1.processing}
        assert store.complete(v1.processing, "w-old", make_result(), now=clock.now)
        assert store.topup(key.id, 0.0) == pytest.approx(9.25)  # the cancelled one refunded
        assert [(e.job_id, e.type) for e in store.events(after=None, limit=10)][1:] == [
            (v1.queued_other_model, JobEventType.FAILED),
            (v1.queued, JobEventType.PROCESSING),
            (v1.processing, JobEventType.COMPLETED),
        ]
    finally:
        store.close()
    SqliteStore(db_path).close()  # opening an upgraded file again changes nothing
    assert _version(db_path) == [(SCHEMA_VERSION,)]


def test_an_upgraded_files_queued_jobs_count_against_the_queue_limits(
    db_path: Path, clock: Clock
) -> None:
    """The queue counts start from the jobs an older file already holds (2 QUEUED of one key)."""
    v1 = make_v1_database(db_path, now=clock.now)
    store = SqliteStore(db_path)
    try:
        other = make_key(store, clock)
        with pytest.raises(QueueFull):
            store.submit(make_job(other, clock), rpm=0, now=clock.now, max_queued=2)
        store.submit(make_job(other, clock), rpm=0, now=clock.now, max_queued=3)
        assert store.update_key(v1.key_id, max_queued=2) is not None
        key = store.get_key(v1.key_id)
        assert key is not None
        with pytest.raises(KeyQueueFull):
            store.submit(make_job(key, clock, cost_usd=0.0), rpm=0, now=clock.now)
        store.cancel(v1.queued, key.id, now=clock.now)
        store.submit(make_job(key, clock, cost_usd=0.0), rpm=0, now=clock.now)
    finally:
        store.close()


def test_a_failed_upgrade_leaves_the_file_as_it_was(
    db_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = make_v1_database(db_path, now=clock.now)
    broken = (*schema.MIGRATIONS[:1], (2, (*schema.MIGRATIONS[1][1], "NOT SQL")))
    monkeypatch.setattr(schema, "MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError):
        SqliteStore(db_path)
    assert _version(db_path) == [(1,)]
    assert "extra" in _columns(db_path, "jobs")
    assert "progress_step" not in _columns(db_path, "jobs")
    monkeypatch.undo()
    store = SqliteStore(db_path)
    try:
        assert store.get_job(v1.completed, now=clock.now) is not None
    finally:
        store.close()


def test_newer_schema_is_refused(db_path: Path) -> None:
    SqliteStore(db_path).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(QwenServeError, match="newer"):
        SqliteStore(db_path)


def test_locked_database_reads_on_and_writes_fail_cleanly(db_path: Path, clock: Clock) -> None:
    """A writer stuck elsewhere never blocks readers (WAL) and turns into a 503, not a crash."""
    store = SqliteStore(db_path, busy_timeout_s=0.2)
    try:
        key = make_key(store, clock)
        job = make_job(key, clock)
        store.submit(job, rpm=0, now=clock.now)
        raw = sqlite3.connect(db_path, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        try:
            assert store.get_job(job.id, now=clock.now) is not None
            with pytest.raises(ServiceUnavailable):
                store.submit(make_job(key, clock), rpm=0, now=clock.now)
        finally:
            raw.execute("ROLLBACK")
            raw.close()
        store.submit(make_job(key, clock), rpm=0, now=clock.now)
    finally:
        store.close()


def test_waiting_writer_gets_its_turn(db_path: Path, clock: Clock) -> None:
    store = SqliteStore(db_path)
    try:
        key = make_key(store, clock, balance_usd=1.0)
        raw = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        raw.execute("BEGIN IMMEDIATE")
        releaser = threading.Timer(0.3, lambda: raw.execute("COMMIT"))
        releaser.start()
        started = time.monotonic()
        store.submit(make_job(key, clock, cost_usd=0.5), rpm=0, now=clock.now)
        assert time.monotonic() - started >= 0.25
        releaser.join()
        raw.close()
        assert store.topup(key.id, 0.0) == pytest.approx(0.5)
    finally:
        store.close()


def test_revoked_or_unknown_key_cannot_submit(store: SqliteStore, clock: Clock) -> None:
    """A key revoked between authentication and submit gets no job in and pays nothing."""
    key = make_key(store, clock, balance_usd=1.0)
    assert store.revoke_key(key.id)
    job = make_job(key, clock)
    with pytest.raises(Unauthenticated):
        store.submit(job, rpm=0, now=clock.now)
    assert store.get_job(job.id, now=clock.now) is None
    assert store.topup(key.id, 0.0) == pytest.approx(1.0)
    stranger = make_job(dataclasses.replace(key, id="no-such-key"), clock)
    with pytest.raises(Unauthenticated):
        store.submit(stranger, rpm=0, now=clock.now)


def test_used_from_many_threads_then_closed(db_path: Path, clock: Clock) -> None:
    store = SqliteStore(db_path)
    key = make_key(store, clock)
    seen: list[int] = []
    threads = [
        threading.Thread(target=lambda: seen.append(len(store.list_keys()))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [1, 1, 1, 1]
    store.close()
    with pytest.raises(QwenServeError, match="closed"):
        store.get_key(key.id)


_KILLED_MID_WORK = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from qwenserve.catalog import validate_request
    from qwenserve.jobs import Job, JobStatus
    from qwenserve.store.base import ApiKey
    from qwenserve.store.sqlite import SqliteStore

    REQUEST = validate_request("qwen-image", {"prompt": "a cat"})
    now = float(sys.argv[2])
    store = SqliteStore(Path(sys.argv[1]))
    store.create_key(ApiKey(id="k", key_hash="h" * 64, name="k", balance_usd=1.0, rpm=0))
    for n in range(3):
        store.submit(Job(id=f"j{n}", key_id="k", request=REQUEST,
                         status=JobStatus.QUEUED, created_at=now, expires_at=now + 3600,
                         cost_usd=0.25), rpm=0, now=now)
    store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=now, limit=2)
    store.cancel("j2", "k", now=now)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_event_log_survives_kill_9(db_path: Path, clock: Clock) -> None:
    """The log is in the same file as the jobs: a process killed mid-work loses none of it."""
    process = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_WORK, str(db_path), repr(clock.now)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    store = SqliteStore(db_path)
    try:
        events = [(e.job_id, e.type, e.error_kind) for e in store.events(after=None, limit=20)]
        assert events == [
            ("j0", JobEventType.QUEUED, None),
            ("j1", JobEventType.QUEUED, None),
            ("j2", JobEventType.QUEUED, None),
            ("j0", JobEventType.PROCESSING, None),
            ("j1", JobEventType.PROCESSING, None),
            ("j2", JobEventType.FAILED, CANCELLED),
        ]
        assert store.topup("k", 0.0) == pytest.approx(0.5)
        # the restart path: leases expire, the jobs run again, and the log goes on from there
        assert store.expire_leases(now=clock.now) == 2
        last = store.last_event_id()
        store.claim("w2", slugs=None, lease_s=30, max_attempts=3, now=clock.now, limit=2)
        assert [(e.job_id, e.attempt) for e in store.events(after=last, limit=10)] == [
            ("j0", 2),
            ("j1", 2),
        ]
    finally:
        store.close()


# --- several processes on one file ---------------------------------------------------------
_SUBMITTER = textwrap.dedent(
    """
    import json, sys, time, uuid
    from pathlib import Path
    from qwenserve.errors import InsufficientCredits
    from qwenserve.catalog import validate_request
    from qwenserve.jobs import Job, JobStatus
    from qwenserve.store.sqlite import SqliteStore

    REQUEST = validate_request("qwen-image", {"prompt": "a cat"})
    path, key_id, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    now = float(sys.argv[5])
    store = SqliteStore(Path(path))
    while not go.exists():
        time.sleep(0.005)
    accepted = []
    for _ in range(count):
        job = Job(id=str(uuid.uuid4()), key_id=key_id, request=REQUEST,
                  status=JobStatus.QUEUED, created_at=now, expires_at=now + 3600, cost_usd=0.01)
        try:
            store.submit(job, rpm=0, now=now)
        except InsufficientCredits:
            continue
        accepted.append(job.id)
    claimed = []
    while True:
        jobs = store.claim(sys.argv[6], slugs=None, lease_s=60, max_attempts=3, now=now, limit=3)
        if not jobs:
            break
        claimed += [j.id for j in jobs]
    store.close()
    print(json.dumps({"accepted": accepted, "claimed": claimed}))
    """
)


def test_two_processes_submit_and_claim_exactly(
    db_path: Path, tmp_path: Path, clock: Clock
) -> None:
    store = SqliteStore(db_path)
    key = make_key(store, clock, balance_usd=1.5)  # exactly 150 runs at $0.01
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SUBMITTER,
                str(db_path),
                key.id,
                "100",
                str(go),
                repr(clock.now),
                f"proc{i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    go.touch()
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        reports.append(json.loads(out))
    try:
        accepted = [job_id for report in reports for job_id in report["accepted"]]
        claimed = [job_id for report in reports for job_id in report["claimed"]]
        assert len(accepted) == 150
        assert store.get_key(key.id) is not None
        assert store.topup(key.id, 0.0) == pytest.approx(0.0, abs=1e-9)
        assert len(claimed) == len(set(claimed)) == 150
        assert set(claimed) == set(accepted)
    finally:
        store.close()
