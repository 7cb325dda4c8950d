"""The embedded Store: one SQLite file in WAL mode, safe across threads and processes.

Every writing operation is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write lock up
front, so two writers (API threads, worker threads, or the ``qwenserve keys`` CLI in another
process) queue on ``busy_timeout`` instead of failing half-way or deadlocking on a lock upgrade.
Readers never block in WAL mode. Each thread gets its own connection (sqlite3 connections are
not meant to be shared between threads mid-transaction).

Money is kept as integer micro-USD (``*_micro`` columns) so that repeated debits and refunds are
exact; it is converted to float USD only at this module's edge.

Rate limits use a fixed window per key: the first admitted submit opens a 60 s window
(``window_start``) and ``window_count`` counts the submits admitted in it. A submit at or after
``window_start + 60`` opens a new window. A rejected submit (rate-limited or unpaid) counts
nothing, so the limit is on accepted work.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from qwenserve.errors import (
    InsufficientCredits,
    InvalidRequest,
    QwenServeError,
    RateLimited,
    ServiceUnavailable,
    Unauthenticated,
)
from qwenserve.jobs import Job, JobResult, JobStatus
from qwenserve.store.base import ApiKey, QueueStats, Store, SubmitOutcome

SCHEMA_VERSION = 1
DEFAULT_BUSY_TIMEOUT_S = 10.0
RATE_WINDOW_S = 60.0
MICRO_PER_USD = 1_000_000

# The whole schema, in one place: applied idempotently on every open, one statement at a time.
SCHEMA: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS schema_version (
    version      INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS api_keys (
    id              TEXT PRIMARY KEY,
    key_hash        TEXT NOT NULL UNIQUE,
    name            TEXT NOT NULL,
    balance_micro   INTEGER NOT NULL,
    rpm             INTEGER NOT NULL,
    models          TEXT NOT NULL,          -- JSON list of slugs, [] = every model
    created_at      REAL NOT NULL,
    revoked         INTEGER NOT NULL DEFAULT 0,
    window_start    REAL,                   -- rate-limit window opened at (Unix s)
    window_count    INTEGER NOT NULL DEFAULT 0
)
    """,
    """
CREATE TABLE IF NOT EXISTS jobs (
    seq             INTEGER PRIMARY KEY,    -- submit order within one instant
    id              TEXT NOT NULL UNIQUE,
    slug            TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    params          TEXT NOT NULL,          -- JSON
    status          TEXT NOT NULL,
    created_at      REAL NOT NULL,
    expires_at      REAL NOT NULL,
    cost_micro      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    started_at      REAL,
    finished_at     REAL,
    result          TEXT,                   -- JSON of JobResult.to_dict()
    error           TEXT,
    error_kind      TEXT,
    worker_id       TEXT,
    lease_until     REAL,
    extra           TEXT NOT NULL DEFAULT '{}'
)
    """,
    "CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, slug, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at)",
)

_JOB_COLUMNS = (
    "id, slug, key_id, params, status, created_at, expires_at, cost_micro, attempts, "
    "started_at, finished_at, result, error, error_kind, worker_id, lease_until, extra"
)
_KEY_COLUMNS = "id, key_hash, name, balance_micro, rpm, models, created_at, revoked"
_RUNNABLE = "(status = 'QUEUED' OR (status = 'PROCESSING' AND lease_until <= ?))"


def _to_micro(amount_usd: float) -> int:
    return round(amount_usd * MICRO_PER_USD)


def _to_usd(amount_micro: int) -> float:
    return amount_micro / MICRO_PER_USD


def _key_from_row(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        key_hash=row["key_hash"],
        name=row["name"],
        balance_usd=_to_usd(row["balance_micro"]),
        rpm=row["rpm"],
        models=tuple(json.loads(row["models"])),
        created_at=row["created_at"],
        revoked=bool(row["revoked"]),
    )


def _job_from_row(row: sqlite3.Row) -> Job:
    result = row["result"]
    return Job(
        id=row["id"],
        slug=row["slug"],
        key_id=row["key_id"],
        params=json.loads(row["params"]),
        status=JobStatus(row["status"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        cost_usd=_to_usd(row["cost_micro"]),
        attempts=row["attempts"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        result=JobResult.from_dict(json.loads(result)) if result is not None else None,
        error=row["error"],
        error_kind=row["error_kind"],
        worker_id=row["worker_id"],
        lease_until=row["lease_until"],
        extra=json.loads(row["extra"]),
    )


class SqliteStore(Store):
    """A Store in one SQLite file; several instances (and processes) may share the file.

    Args:
        path: the database file; its folder is created if missing.
        busy_timeout_s: how long a writer waits for another one's lock before failing.

    Raises:
        QwenServeError: the file was written by a newer qwenserve (unknown schema version).
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._migrate()

    # --- connections and transactions -------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        if self._closed:
            raise QwenServeError(f"the job store {self.path} is closed")
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        connection = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,  # only so close() may close it from another thread
        )
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout_s * 1000)}")
        connection.execute("PRAGMA journal_mode = WAL")
        # NORMAL is crash-safe in WAL mode; only a power cut may lose the last commits.
        connection.execute("PRAGMA synchronous = NORMAL")
        with self._connections_lock:
            self._connections.append(connection)
        self._local.connection = connection
        return connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic writing step: the write lock is taken first, released on commit/rollback."""
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            # Another writer held the lock for longer than busy_timeout_s: a 503, not a crash.
            raise ServiceUnavailable(
                f"the job store is busy ({error}); retry shortly", field="store"
            ) from None
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot across several SELECTs."""
        connection = self._connection()
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")

    def _migrate(self) -> None:
        # executescript() would commit on its own, so the schema goes in statement by statement.
        with self._write() as db:
            for statement in SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT MAX(version) AS version FROM schema_version").fetchone()
            found = row["version"]
            if found is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif found > SCHEMA_VERSION:
                raise QwenServeError(
                    f"the job store {self.path} has schema version {found}, newer than this "
                    f"qwenserve understands ({SCHEMA_VERSION}): upgrade qwenserve"
                )

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()

    # --- keys and credits -------------------------------------------------------------------
    def create_key(self, key: ApiKey) -> None:
        try:
            with self._write() as db:
                db.execute(
                    f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.id,
                        key.key_hash,
                        key.name,
                        _to_micro(key.balance_usd),
                        key.rpm,
                        json.dumps(list(key.models)),
                        key.created_at,
                        int(key.revoked),
                    ),
                )
        except sqlite3.IntegrityError:
            raise InvalidRequest(
                f"an API key with id {key.id!r} or the same secret already exists", field="key"
            ) from None

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        row = (
            self._connection()
            .execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,))
            .fetchone()
        )
        return _key_from_row(row) if row is not None else None

    def get_key(self, key_id: str) -> ApiKey | None:
        row = (
            self._connection()
            .execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
            .fetchone()
        )
        return _key_from_row(row) if row is not None else None

    def list_keys(self) -> list[ApiKey]:
        rows = (
            self._connection()
            .execute(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")
            .fetchall()
        )
        return [_key_from_row(row) for row in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as db:
            cursor = db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,))
            return cursor.rowcount == 1

    def topup(self, key_id: str, amount_usd: float) -> float:
        with self._write() as db:
            row = db.execute(
                "UPDATE api_keys SET balance_micro = balance_micro + ? WHERE id = ? "
                "RETURNING balance_micro",
                (_to_micro(amount_usd), key_id),
            ).fetchone()
            if row is None:
                raise KeyError(key_id)
            return _to_usd(row["balance_micro"])

    # --- jobs -------------------------------------------------------------------------------
    def submit(self, job: Job, *, rpm: int, now: float) -> SubmitOutcome:
        cost_micro = _to_micro(job.cost_usd)
        with self._write() as db:
            key = db.execute(
                "SELECT balance_micro, window_start, window_count, revoked FROM api_keys "
                "WHERE id = ?",
                (job.key_id,),
            ).fetchone()
            # Checked again here: a key revoked (by the CLI) after the request was authenticated
            # must not get one more job in.
            if key is None or key["revoked"]:
                raise Unauthenticated("invalid API key", field="x-api-key")
            window_start: float | None = key["window_start"]
            window_count: int = key["window_count"]
            remaining: int | None = None
            if rpm > 0:
                if window_start is None or now >= window_start + RATE_WINDOW_S:
                    window_start, window_count = now, 0
                if window_count >= rpm:
                    reset_at = window_start + RATE_WINDOW_S
                    retry_after_s = reset_at - now
                    raise RateLimited(
                        f"rate limit of {rpm} requests per minute reached: "
                        f"retry in {retry_after_s:.0f} s",
                        retry_after_s=retry_after_s,
                        limit=rpm,
                        reset_at=reset_at,
                    )
                window_count += 1
                remaining = rpm - window_count
            balance_micro: int = key["balance_micro"]
            if cost_micro > balance_micro:
                raise InsufficientCredits(
                    f"Not enough credits to process request: this run costs "
                    f"${_to_usd(cost_micro):.4f}, the balance is ${_to_usd(balance_micro):.4f}",
                    field="x-api-key",
                )
            balance_micro -= cost_micro
            db.execute(
                "UPDATE api_keys SET balance_micro = ?, window_start = ?, window_count = ? "
                "WHERE id = ?",
                (balance_micro, window_start, window_count, job.key_id),
            )
            db.execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, ?)",
                (
                    job.id,
                    job.slug,
                    job.key_id,
                    json.dumps(job.params),
                    JobStatus.QUEUED.value,
                    job.created_at,
                    job.expires_at,
                    cost_micro,
                    json.dumps(job.extra),
                ),
            )
        return SubmitOutcome(remaining_usd=_to_usd(balance_micro), rate_limit_remaining=remaining)

    def get_job(self, job_id: str, *, now: float) -> Job | None:
        row = (
            self._connection()
            .execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? AND expires_at > ?", (job_id, now)
            )
            .fetchone()
        )
        return _job_from_row(row) if row is not None else None

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
        if limit <= 0 or (slugs is not None and not slugs):
            return []
        slug_filter = ""
        slug_args: list[str] = []
        if slugs is not None:
            slug_args = sorted(set(slugs))
            slug_filter = f" AND slug IN ({', '.join('?' * len(slug_args))})"
        claimed: list[str] = []
        with self._write() as db:
            # Exhausted jobs are failed on the way and drop out of the runnable set, so the
            # loop ends: each pass either claims or fails every row it read.
            while len(claimed) < limit:
                rows = db.execute(
                    f"SELECT id, status, attempts, key_id, cost_micro FROM jobs "
                    f"WHERE {_RUNNABLE}{slug_filter} ORDER BY created_at, seq LIMIT ?",
                    (now, *slug_args, limit - len(claimed)),
                ).fetchall()
                if not rows:
                    break
                for row in rows:
                    if row["status"] == JobStatus.PROCESSING and row["attempts"] >= max_attempts:
                        self._fail_and_refund(
                            db,
                            row["id"],
                            kind="InferenceError",
                            message=(
                                f"the worker running this job was lost {row['attempts']} times; "
                                f"gave up after {row['attempts']} attempts "
                                f"(max_attempts={max_attempts})"
                            ),
                            now=now,
                        )
                        continue
                    db.execute(
                        "UPDATE jobs SET status = 'PROCESSING', worker_id = ?, lease_until = ?, "
                        "attempts = attempts + 1, started_at = COALESCE(started_at, ?) "
                        "WHERE id = ?",
                        (worker_id, now + lease_s, now, row["id"]),
                    )
                    claimed.append(row["id"])
            if not claimed:
                return []
            marks = ", ".join("?" * len(claimed))
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN ({marks}) ORDER BY created_at, seq",
                claimed,
            ).fetchall()
        return [_job_from_row(row) for row in rows]

    @staticmethod
    def _fail_and_refund(
        db: sqlite3.Connection, job_id: str, *, kind: str, message: str, now: float
    ) -> None:
        """Inside a write transaction: a non-terminal job → FAILED, its cost back to the key."""
        row = db.execute(
            "UPDATE jobs SET status = 'FAILED', error = ?, error_kind = ?, finished_at = ?, "
            "lease_until = NULL WHERE id = ? AND status IN ('QUEUED', 'PROCESSING') "
            "RETURNING key_id, cost_micro",
            (message, kind, now, job_id),
        ).fetchone()
        if row is not None and row["cost_micro"]:
            db.execute(
                "UPDATE api_keys SET balance_micro = balance_micro + ? WHERE id = ?",
                (row["cost_micro"], row["key_id"]),
            )

    def renew_lease(self, job_id: str, worker_id: str, *, lease_s: float, now: float) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_until = ? "
                "WHERE id = ? AND status = 'PROCESSING' AND worker_id = ?",
                (now + lease_s, job_id, worker_id),
            )
            return cursor.rowcount == 1

    def complete(self, job_id: str, worker_id: str, result: JobResult, *, now: float) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = 'COMPLETED', result = ?, finished_at = ?, "
                "lease_until = NULL WHERE id = ? AND status = 'PROCESSING' AND worker_id = ?",
                (json.dumps(result.to_dict()), now, job_id, worker_id),
            )
            return cursor.rowcount == 1

    def fail(
        self, job_id: str, worker_id: str | None, *, kind: str, message: str, now: float
    ) -> bool:
        with self._write() as db:
            row = db.execute("SELECT status, worker_id FROM jobs WHERE id = ?", (job_id,))
            found = row.fetchone()
            if found is None or JobStatus(found["status"]).is_terminal:
                return False
            if worker_id is not None and (
                found["status"] != JobStatus.PROCESSING or found["worker_id"] != worker_id
            ):
                return False
            self._fail_and_refund(db, job_id, kind=kind, message=message, now=now)
            return True

    def release(self, job_id: str, worker_id: str, *, now: float) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = 'QUEUED', worker_id = NULL, lease_until = NULL, "
                "attempts = MAX(attempts - 1, 0), "
                "started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END "
                "WHERE id = ? AND status = 'PROCESSING' AND worker_id = ?",
                (job_id, worker_id),
            )
            return cursor.rowcount == 1

    def expire_leases(self, *, now: float) -> int:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_until = ? WHERE status = 'PROCESSING' "
                "AND (lease_until IS NULL OR lease_until > ?)",
                (now, now),
            )
            return cursor.rowcount

    def purge_expired(self, *, now: float) -> list[Job]:
        with self._write() as db:
            # A paid job that expired before it ever ran gives its money back.
            db.execute(
                "UPDATE api_keys SET balance_micro = balance_micro + (SELECT COALESCE("
                "SUM(cost_micro), 0) FROM jobs WHERE jobs.key_id = api_keys.id AND "
                "expires_at <= ? AND status IN ('QUEUED', 'PROCESSING')) WHERE id IN ("
                "SELECT key_id FROM jobs WHERE expires_at <= ? AND status IN "
                "('QUEUED', 'PROCESSING'))",
                (now, now),
            )
            rows = db.execute(
                f"DELETE FROM jobs WHERE expires_at <= ? RETURNING {_JOB_COLUMNS}", (now,)
            ).fetchall()
        return [_job_from_row(row) for row in rows]

    def stats(self, *, now: float) -> QueueStats:
        queued: dict[str, int] = {}
        processing: dict[str, int] = {}
        with self._read() as db:
            rows = db.execute(
                "SELECT slug, status, COUNT(*) AS n FROM jobs "
                "WHERE status IN ('QUEUED', 'PROCESSING') GROUP BY slug, status"
            ).fetchall()
            oldest = db.execute(
                "SELECT MIN(created_at) AS oldest FROM jobs WHERE status = 'QUEUED'"
            ).fetchone()["oldest"]
        for row in rows:
            target = queued if row["status"] == JobStatus.QUEUED else processing
            target[row["slug"]] = row["n"]
        return QueueStats(
            queued_by_model=queued,
            processing_by_model=processing,
            oldest_queued_age_s=max(0.0, now - oldest) if oldest is not None else None,
        )
