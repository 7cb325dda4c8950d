"""The SQLite store: the shared contract, plus what only a file on disk can promise."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenserve.config import Settings
from qwenserve.errors import QwenServeError, ServiceUnavailable, Unauthenticated
from qwenserve.jobs import JobStatus
from qwenserve.store import open_store
from qwenserve.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.store.contract import Clock, StoreContract, make_job, make_key, make_result


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


class TestSqliteStore(StoreContract):
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


def test_open_store_chooses_sqlite(tmp_path: Path, clock: Clock) -> None:
    default = open_store(Settings(data_dir=tmp_path / "data"))
    try:
        assert isinstance(default, SqliteStore)
        assert default.path == tmp_path / "data" / "qwenserve.db"
        make_key(default, clock)
    finally:
        default.close()
    assert (tmp_path / "data" / "qwenserve.db").exists()
    explicit_path = tmp_path / "elsewhere.db"
    explicit = open_store(Settings(data_dir=tmp_path, store=f"sqlite:///{explicit_path}"))
    try:
        assert isinstance(explicit, SqliteStore) and explicit.path == explicit_path
    finally:
        explicit.close()


# --- several processes on one file ---------------------------------------------------------
_SUBMITTER = textwrap.dedent(
    """
    import json, sys, time, uuid
    from pathlib import Path
    from qwenserve.errors import InsufficientCredits
    from qwenserve.jobs import Job, JobStatus
    from qwenserve.store.sqlite import SqliteStore

    path, key_id, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    now = float(sys.argv[5])
    store = SqliteStore(Path(path))
    while not go.exists():
        time.sleep(0.005)
    accepted = []
    for _ in range(count):
        job = Job(id=str(uuid.uuid4()), slug="qwen-image", key_id=key_id, params={},
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
