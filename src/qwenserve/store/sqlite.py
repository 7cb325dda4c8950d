"""The embedded store: one SQLite file in WAL mode, every write one ``BEGIN IMMEDIATE`` transaction.

Safe from many threads (one connection per thread) and from several processes on one machine
(the `qwenserve keys` CLI while the server runs): SQLite's own write lock serializes the
transactions, and ``busy_timeout`` makes a writer wait its turn instead of failing.

Money is kept in integer micro-dollars so debits and refunds never drift. Rate limits use a fixed
one-minute window per key (``window_start`` = the minute's start, ``count`` = requests in it).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from qwenserve.errors import InsufficientCredits, RateLimited
from qwenserve.jobs import Job, JobResult, JobStatus
from qwenserve.store.base import ApiKey, QueueStats, SubmitOutcome

SCHEMA_VERSION = 1
RATE_WINDOW_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    balance_micro INTEGER NOT NULL,
    rpm INTEGER NOT NULL,
    models TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rate_windows (
    key_id TEXT PRIMARY KEY,
    window_start REAL NOT NULL,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    slug TEXT NOT NULL,
    key_id TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    cost_micro INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    result TEXT,
    error TEXT,
    error_kind TEXT,
    worker_id TEXT,
    lease_until REAL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_runnable ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
"""

_ACTIVE = (JobStatus.QUEUED.value, JobStatus.PROCESSING.value)


def to_micro(usd: float) -> int:
    return round(usd * 1_000_000)


def from_micro(micro: int) -> float:
    return micro / 1_000_000


class SqliteStore:
    """The Store protocol on one SQLite file."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._conn().executescript(SCHEMA)  # idempotent; each statement commits on its own
        with self._write() as db:
            if db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))

    # --- connections --------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    # --- keys -----------------------------------------------------------------------------
    @staticmethod
    def _key(row: sqlite3.Row) -> ApiKey:
        return ApiKey(
            id=row["id"],
            key_hash=row["key_hash"],
            name=row["name"],
            balance_usd=from_micro(row["balance_micro"]),
            rpm=row["rpm"],
            models=tuple(json.loads(row["models"])),
            created_at=row["created_at"],
            revoked=bool(row["revoked"]),
        )

    def create_key(self, key: ApiKey) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO api_keys (id, key_hash, name, balance_micro, rpm, models, created_at,"
                " revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    key.key_hash,
                    key.name,
                    to_micro(key.balance_usd),
                    key.rpm,
                    json.dumps(list(key.models)),
                    key.created_at,
                    int(key.revoked),
                ),
            )

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        row = self._conn().execute("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,))
        found = row.fetchone()
        return self._key(found) if found else None

    def get_key(self, key_id: str) -> ApiKey | None:
        found = self._conn().execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return self._key(found) if found else None

    def list_keys(self) -> list[ApiKey]:
        rows = self._conn().execute("SELECT * FROM api_keys ORDER BY created_at, id")
        return [self._key(r) for r in rows.fetchall()]

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as db:
            return (
                db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,)).rowcount > 0
            )

    def topup(self, key_id: str, amount_usd: float) -> float:
        with self._write() as db:
            db.execute(
                "UPDATE api_keys SET balance_micro = balance_micro + ? WHERE id = ?",
                (to_micro(amount_usd), key_id),
            )
            row = db.execute("SELECT balance_micro FROM api_keys WHERE id = ?", (key_id,))
            found = row.fetchone()
            if found is None:
                raise KeyError(key_id)
            return from_micro(found[0])

    # --- jobs -----------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"],
            slug=row["slug"],
            key_id=row["key_id"],
            params=json.loads(row["params"]),
            status=JobStatus(row["status"]),
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            cost_usd=from_micro(row["cost_micro"]),
            attempts=row["attempts"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            result=JobResult.from_dict(json.loads(row["result"])) if row["result"] else None,
            error=row["error"],
            error_kind=row["error_kind"],
            worker_id=row["worker_id"],
            lease_until=row["lease_until"],
            extra=json.loads(row["extra"]),
        )

    def submit(self, job: Job, *, rpm: int, now: float) -> SubmitOutcome:
        cost = to_micro(job.cost_usd)
        with self._write() as db:
            key = db.execute(
                "SELECT balance_micro FROM api_keys WHERE id = ?", (job.key_id,)
            ).fetchone()
            if key is None:
                raise KeyError(job.key_id)
            remaining_rate = self._count_request(db, job.key_id, rpm, now)
            if key["balance_micro"] < cost:
                raise InsufficientCredits(
                    f"insufficient credits: this run costs ${job.cost_usd:.4f}, "
                    f"the balance is ${from_micro(key['balance_micro']):.4f}"
                )
            db.execute(
                "UPDATE api_keys SET balance_micro = balance_micro - ? WHERE id = ?",
                (cost, job.key_id),
            )
            db.execute(
                "INSERT INTO jobs (id, slug, key_id, params, status, created_at, expires_at,"
                " cost_micro, attempts, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    job.id,
                    job.slug,
                    job.key_id,
                    json.dumps(job.params),
                    JobStatus.QUEUED.value,
                    job.created_at,
                    job.expires_at,
                    cost,
                    json.dumps(job.extra),
                ),
            )
            balance = key["balance_micro"] - cost
        return SubmitOutcome(remaining_usd=from_micro(balance), rate_limit_remaining=remaining_rate)

    @staticmethod
    def _count_request(db: sqlite3.Connection, key_id: str, rpm: int, now: float) -> int | None:
        """Count one request in the key's current minute; RateLimited when it is full.

        The count is only written when the whole submit commits, so a refused submit (for
        credits) does not use up the window either.
        """
        if rpm <= 0:
            return None
        window_start = math.floor(now / RATE_WINDOW_S) * RATE_WINDOW_S
        row = db.execute(
            "SELECT window_start, count FROM rate_windows WHERE key_id = ?", (key_id,)
        ).fetchone()
        count = row["count"] if row is not None and row["window_start"] == window_start else 0
        if count >= rpm:
            reset_at = window_start + RATE_WINDOW_S
            raise RateLimited(
                f"rate limit exceeded: {rpm} requests per minute",
                retry_after_s=reset_at - now,
                limit=rpm,
                reset_at=reset_at,
            )
        db.execute(
            "INSERT INTO rate_windows (key_id, window_start, count) VALUES (?, ?, ?) "
            "ON CONFLICT(key_id) DO UPDATE SET window_start = excluded.window_start, "
            "count = excluded.count",
            (key_id, window_start, count + 1),
        )
        return rpm - count - 1

    def get_job(self, job_id: str, *, now: float) -> Job | None:
        row = (
            self._conn()
            .execute("SELECT * FROM jobs WHERE id = ? AND expires_at > ?", (job_id, now))
            .fetchone()
        )
        return self._job(row) if row else None

    def claim(
        self,
        worker_id: str,
        *,
        slugs: Collection[str] | None,
        lease_s: float,
        max_attempts: int,
        now: float,
        limit: int = 1,
    ) -> list[Job]:
        slug_filter, slug_args = "", cast(tuple[str, ...], ())
        if slugs is not None:
            slug_list = tuple(slugs)
            if not slug_list:
                return []
            slug_filter = f" AND slug IN ({','.join('?' * len(slug_list))})"
            slug_args = slug_list
        with self._write() as db:
            exhausted = db.execute(
                "SELECT id, attempts FROM jobs WHERE status = 'PROCESSING' AND lease_until <= ?"
                " AND attempts >= ?" + slug_filter,
                (now, max_attempts, *slug_args),
            ).fetchall()
            for row in exhausted:
                self._fail_in(
                    db,
                    row["id"],
                    kind="InferenceError",
                    message=(
                        f"the job stopped its worker {row['attempts']} times "
                        f"(max attempts {max_attempts}); giving up"
                    ),
                    now=now,
                )
            rows = db.execute(
                "SELECT id FROM jobs WHERE expires_at > ? AND (status = 'QUEUED' OR "
                "(status = 'PROCESSING' AND lease_until <= ?))"
                + slug_filter
                + " ORDER BY created_at, rowid LIMIT ?",
                (now, now, *slug_args, limit),
            ).fetchall()
            ids = [r["id"] for r in rows]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET status = 'PROCESSING', worker_id = ?, lease_until = ?,"
                    " attempts = attempts + 1, started_at = COALESCE(started_at, ?) WHERE id = ?",
                    (worker_id, now + lease_s, now, job_id),
                )
            claimed = [
                self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
                for job_id in ids
            ]
        return claimed

    def renew_lease(self, job_id: str, worker_id: str, *, lease_s: float, now: float) -> bool:
        with self._write() as db:
            return (
                db.execute(
                    "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'PROCESSING'"
                    " AND worker_id = ?",
                    (now + lease_s, job_id, worker_id),
                ).rowcount
                > 0
            )

    def complete(self, job_id: str, worker_id: str, result: JobResult, *, now: float) -> bool:
        with self._write() as db:
            return (
                db.execute(
                    "UPDATE jobs SET status = 'COMPLETED', result = ?, finished_at = ?,"
                    " lease_until = NULL WHERE id = ? AND status = 'PROCESSING' AND worker_id = ?",
                    (json.dumps(result.to_dict()), now, job_id, worker_id),
                ).rowcount
                > 0
            )

    def fail(
        self, job_id: str, worker_id: str | None, *, kind: str, message: str, now: float
    ) -> bool:
        with self._write() as db:
            row = db.execute("SELECT status, worker_id FROM jobs WHERE id = ?", (job_id,))
            found = row.fetchone()
            if found is None or found["status"] not in _ACTIVE:
                return False
            if worker_id is not None and (
                found["status"] != JobStatus.PROCESSING.value or found["worker_id"] != worker_id
            ):
                return False
            self._fail_in(db, job_id, kind=kind, message=message, now=now)
            return True

    @staticmethod
    def _fail_in(
        db: sqlite3.Connection, job_id: str, *, kind: str, message: str, now: float
    ) -> None:
        """Fail an active job and refund its cost, inside the caller's transaction."""
        db.execute(
            "UPDATE api_keys SET balance_micro = balance_micro + "
            "(SELECT cost_micro FROM jobs WHERE id = ?) "
            "WHERE id = (SELECT key_id FROM jobs WHERE id = ?)",
            (job_id, job_id),
        )
        db.execute(
            "UPDATE jobs SET status = 'FAILED', error = ?, error_kind = ?, finished_at = ?,"
            " lease_until = NULL WHERE id = ?",
            (message, kind, now, job_id),
        )

    def release(self, job_id: str, worker_id: str, *, now: float) -> bool:
        with self._write() as db:
            return (
                db.execute(
                    "UPDATE jobs SET status = 'QUEUED', worker_id = NULL, lease_until = NULL,"
                    " attempts = MAX(attempts - 1, 0) WHERE id = ? AND status = 'PROCESSING'"
                    " AND worker_id = ?",
                    (job_id, worker_id),
                ).rowcount
                > 0
            )

    def expire_leases(self, *, now: float) -> int:
        with self._write() as db:
            return db.execute(
                "UPDATE jobs SET lease_until = ? WHERE status = 'PROCESSING'", (now,)
            ).rowcount

    def purge_expired(self, *, now: float) -> list[Job]:
        with self._write() as db:
            rows = db.execute("SELECT * FROM jobs WHERE expires_at <= ?", (now,)).fetchall()
            jobs = [self._job(r) for r in rows]
            for job in jobs:
                if not job.status.is_terminal:  # never ran: give the money back
                    db.execute(
                        "UPDATE api_keys SET balance_micro = balance_micro + ? WHERE id = ?",
                        (to_micro(job.cost_usd), job.key_id),
                    )
            db.execute("DELETE FROM jobs WHERE expires_at <= ?", (now,))
        return jobs

    def stats(self, *, now: float) -> QueueStats:
        db = self._conn()
        queued: dict[str, int] = {}
        processing: dict[str, int] = {}
        rows = db.execute(
            "SELECT slug, status, COUNT(*) AS n, MIN(created_at) AS oldest FROM jobs"
            " WHERE status IN ('QUEUED', 'PROCESSING') AND expires_at > ? GROUP BY slug, status",
            (now,),
        ).fetchall()
        oldest: float | None = None
        for row in rows:
            if row["status"] == JobStatus.QUEUED.value:
                queued[row["slug"]] = row["n"]
                oldest = row["oldest"] if oldest is None else min(oldest, row["oldest"])
            else:
                processing[row["slug"]] = row["n"]
        return QueueStats(
            queued_by_model=queued,
            processing_by_model=processing,
            oldest_queued_age_s=None if oldest is None else max(0.0, now - oldest),
        )
