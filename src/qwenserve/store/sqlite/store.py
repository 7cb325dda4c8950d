"""The embedded Store: one SQLite file in WAL mode, safe across threads and processes.

Every writing operation is one ``BEGIN IMMEDIATE`` transaction (``connection.py``), so a state
change, its money and its event-log entry commit together or not at all. The schema and its
migrations are in ``schema.py``.

Money is kept as integer micro-USD (``*_micro`` columns) so that repeated debits and refunds are
exact (``store.rules``).

Rate limits use a fixed window per key: the first admitted submit opens a 60 s window
(``window_start``) and ``window_count`` counts the submits admitted in it. A submit at or after
``window_start + 60`` opens a new window. A rejected submit (rate-limited or unpaid) counts
nothing, so the limit is on accepted work.

The event log is the ``job_events`` table, ordered by its AUTOINCREMENT ``seq`` (the event id,
as text). Writers are serialised by the write lock, so seqs commit in order: a reader resuming
after seq N never misses an event committed later with a smaller seq. Being in the same file, the
log survives a kill -9 like the jobs do. Each append returns its event (``INSERT ... RETURNING``,
``transitions.announce``), so every transition returns the events it appended.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Mapping
from pathlib import Path

from qwenserve.jobs import (
    CANCELLED,
    EXPIRED,
    Job,
    JobEvent,
    JobEventType,
    JobResult,
    JobStatus,
    Progress,
)
from qwenserve.store import fair, rules
from qwenserve.store.base import (
    Cancelled,
    Claimed,
    Heartbeat,
    Idempotency,
    Purged,
    QueueStats,
    Store,
    SubmitOutcome,
)
from qwenserve.store.history import HistoryPolicy
from qwenserve.store.records import (
    EVENT_FIELDS,
    JOB_FIELDS,
    event_from_record,
    job_from_record,
    request_text,
)
from qwenserve.store.sqlite import fair_order, history, idempotent
from qwenserve.store.sqlite.claims import claim_jobs
from qwenserve.store.sqlite.connection import DEFAULT_BUSY_TIMEOUT_S, SqliteDatabase
from qwenserve.store.sqlite.history import SqliteHistory
from qwenserve.store.sqlite.keys import SqliteKeys
from qwenserve.store.sqlite.schema import migrate
from qwenserve.store.sqlite.transitions import announce as _announce
from qwenserve.store.sqlite.transitions import check_queue_limits as _check_queue_limits
from qwenserve.store.sqlite.transitions import end_missed_starts as _end_missed_starts
from qwenserve.store.sqlite.transitions import fail_and_refund as _fail_and_refund
from qwenserve.store.sqlite.webhooks import SqliteWebhooks

_JOB_COLUMNS = ", ".join(JOB_FIELDS)
_EVENT_COLUMNS = "seq, " + ", ".join(EVENT_FIELDS)
_OWNED = "id = ? AND status = 'PROCESSING' AND worker_id = ?"


def _job(row: sqlite3.Row) -> Job:
    return job_from_record(dict(row))


def _event(row: sqlite3.Row) -> JobEvent:
    return event_from_record(str(row["seq"]), dict(row))


def _seq(after: str | None) -> int:
    if after is None:
        return 0
    try:
        return int(after)
    except ValueError:
        raise rules.invalid_event_id(after) from None


class SqliteStore(SqliteKeys, SqliteHistory, SqliteWebhooks, Store):
    """A Store in one SQLite file; several instances (and processes) may share the file.

    Args:
        path: the database file; its folder is created if missing.
        busy_timeout_s: how long a writer waits for another one's lock before failing.

    Raises:
        QwenServeError: the file was written by a newer qwenserve (unknown schema version).
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        history_policy: HistoryPolicy = HistoryPolicy(),  # noqa: B008 - frozen
    ) -> None:
        self.history_policy = history_policy
        self._db = SqliteDatabase(path, busy_timeout_s=busy_timeout_s)
        self.path = self._db.path
        self.busy_timeout_s = busy_timeout_s
        with self._db.write() as db:
            migrate(db, self.path)

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        self._db.close()

    def _one(self, sql: str, args: tuple[object, ...]) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.connection().execute(sql, args).fetchone()
        return row

    # --- jobs -------------------------------------------------------------------------------
    def submit(
        self,
        job: Job,
        *,
        rpm: int,
        now: float,
        idempotency: Idempotency | None = None,
        max_queued: int = 0,
    ) -> SubmitOutcome:
        refused = job.status is JobStatus.FAILED  # refused by the API (content policy)
        cost_micro = 0 if refused else rules.to_micro(job.cost_usd)
        with self._db.write() as db:
            key = db.execute(
                "SELECT balance_micro, window_start, window_count, revoked, max_queued "
                "FROM api_keys WHERE id = ?",
                (job.key_id,),
            ).fetchone()
            # Checked again here: a key revoked (by the CLI) after the request was authenticated
            # must not get one more job in.
            if key is None or key["revoked"]:
                raise rules.invalid_key()
            if idempotency is not None:
                original = idempotent.replay_of(db, job.key_id, idempotency, now=now)
                if original is not None:
                    return idempotent.replayed(key, original, rpm=rpm, now=now)
                idempotent.record(db, job.key_id, idempotency, job.id, now=now)
            if not refused:  # a refused job is never queued: no queue limit applies
                _check_queue_limits(db, job.key_id, max_queued, key["max_queued"])
            window_start: float | None = key["window_start"]
            window_count: int = key["window_count"]
            remaining: int | None = None
            if rpm > 0:
                if window_start is None or now >= window_start + rules.RATE_WINDOW_S:
                    window_start, window_count = now, 0
                if window_count >= rpm:
                    raise rules.rate_limited(
                        rpm, reset_at=window_start + rules.RATE_WINDOW_S, now=now
                    )
                window_count += 1
                remaining = rpm - window_count
            balance_micro: int = key["balance_micro"]
            if cost_micro > balance_micro:
                raise rules.insufficient_credits(cost_micro, balance_micro)
            balance_micro -= cost_micro
            db.execute(
                "UPDATE api_keys SET balance_micro = ?, window_start = ?, window_count = ? "
                "WHERE id = ?",
                (balance_micro, window_start, window_count, job.key_id),
            )
            db.execute(
                "INSERT INTO jobs (id, slug, key_id, params, status, created_at, expires_at, "
                "cost_micro, webhook_url, start_by, error, error_kind, finished_at, service) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.slug,
                    job.key_id,
                    request_text(job.request),
                    JobStatus.FAILED.value if refused else JobStatus.QUEUED.value,
                    job.created_at,
                    job.expires_at,
                    cost_micro,
                    job.webhook_url,
                    job.start_by,
                    *((job.error, job.error_kind, now) if refused else (None, None, None)),
                    fair.service_units(job.request),
                ),
            )
            history.insert(db, job, self.history_policy)
            if refused:
                event = _announce(
                    db, job.id, JobEventType.FAILED, now=now, kind=job.error_kind, message=job.error
                )
            else:
                event = _announce(db, job.id, JobEventType.QUEUED, now=now)
        return SubmitOutcome(
            remaining_usd=rules.to_usd(balance_micro), rate_limit_remaining=remaining, event=event
        )

    def get_job(self, job_id: str, *, now: float) -> Job | None:
        row = self._one(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? AND expires_at > ?", (job_id, now)
        )
        return _job(row) if row is not None else None

    def claim(
        self,
        worker_id: str,
        *,
        slugs: Collection[str] | None,
        lease_s: float,
        max_attempts: int,
        now: float,
        limit: int = 1,
    ) -> Claimed:
        if limit <= 0 or (slugs is not None and not slugs):
            return Claimed()
        chosen = sorted(set(slugs)) if slugs is not None else None
        with self._db.write() as db:
            claimed, events = claim_jobs(
                db,
                worker_id,
                slugs=chosen,
                lease_s=lease_s,
                max_attempts=max_attempts,
                now=now,
                limit=limit,
            )
            if not claimed:
                return Claimed(events=events)
            marks = ", ".join("?" * len(claimed))
            found = {
                row["id"]: _job(row)
                for row in db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN ({marks})", claimed
                ).fetchall()
            }
        return Claimed((found[job_id] for job_id in claimed if job_id in found), events)

    def heartbeat(
        self, worker_id: str, progress: Mapping[str, Progress | None], *, lease_s: float, now: float
    ) -> Heartbeat:
        owned: set[str] = set()
        cancelled: set[str] = set()
        if not progress:  # nothing held: no need to take the write lock
            return Heartbeat(owned=frozenset(), cancelled=frozenset(), lost=frozenset())
        with self._db.write() as db:
            for job_id, report in progress.items():
                step = report.step if report is not None else None
                total = report.total_steps if report is not None else None
                at = now if report is not None else None
                row = db.execute(
                    "UPDATE jobs SET lease_until = ?, progress_step = COALESCE(?, progress_step), "
                    "progress_total = COALESCE(?, progress_total), "
                    f"progress_at = COALESCE(?, progress_at) WHERE {_OWNED} "
                    "RETURNING cancel_requested_at",
                    (now + lease_s, step, total, at, job_id, worker_id),
                ).fetchone()
                if row is None:
                    continue
                owned.add(job_id)
                if row["cancel_requested_at"] is not None:
                    cancelled.add(job_id)
        return Heartbeat(
            owned=frozenset(owned),
            cancelled=frozenset(cancelled),
            lost=frozenset(progress) - owned,
        )

    def complete(
        self, job_id: str, worker_id: str, result: JobResult, *, now: float
    ) -> JobEvent | None:
        with self._db.write() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = 'COMPLETED', result = ?, finished_at = ?, "
                f"lease_until = NULL WHERE {_OWNED}",
                (json.dumps(result.to_dict()), now, job_id, worker_id),
            )
            if cursor.rowcount != 1:
                return None
            return _announce(db, job_id, JobEventType.COMPLETED, now=now)

    def fail(
        self,
        job_id: str,
        worker_id: str | None,
        *,
        kind: str,
        message: str,
        now: float,
        refund: bool = True,
    ) -> JobEvent | None:
        with self._db.write() as db:
            if (
                worker_id is not None
                and db.execute(f"SELECT 1 FROM jobs WHERE {_OWNED}", (job_id, worker_id)).fetchone()
                is None
            ):
                return None
            return _fail_and_refund(db, job_id, kind=kind, message=message, now=now, refund=refund)

    def release(self, job_id: str, worker_id: str, *, now: float) -> JobEvent | None:
        with self._db.write() as db:
            row = db.execute(
                f"SELECT cancel_requested_at FROM jobs WHERE {_OWNED}", (job_id, worker_id)
            ).fetchone()
            if row is None:
                return None
            if row["cancel_requested_at"] is not None:
                return _fail_and_refund(
                    db, job_id, kind=CANCELLED, message=rules.CANCELLED_RELEASED, now=now
                )
            db.execute(
                "UPDATE jobs SET status = 'QUEUED', worker_id = NULL, lease_until = NULL, "
                "attempts = MAX(attempts - 1, 0), "
                "started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END, "
                "progress_step = NULL, progress_total = NULL, progress_at = NULL WHERE id = ?",
                (job_id,),
            )
            fair_order.unclaim(db, job_id)
            return _announce(db, job_id, JobEventType.QUEUED, now=now)

    def cancel(self, job_id: str, key_id: str, *, now: float) -> Cancelled:
        with self._db.write() as db:
            row = db.execute(
                "SELECT key_id, status, expires_at, lease_until, cancel_requested_at FROM jobs "
                "WHERE id = ?",
                (job_id,),
            ).fetchone()
            if row is None or row["key_id"] != key_id or row["expires_at"] <= now:
                raise rules.unknown_request(job_id)
            status = JobStatus(row["status"])
            if status.is_terminal:
                raise rules.already_ended(job_id, status.value)
            events: list[JobEvent | None] = []
            if status is JobStatus.QUEUED:
                message = rules.CANCELLED_BEFORE_START
                events.append(
                    _fail_and_refund(db, job_id, kind=CANCELLED, message=message, now=now)
                )
            else:
                if row["cancel_requested_at"] is None:
                    db.execute(
                        "UPDATE jobs SET cancel_requested_at = ? WHERE id = ?", (now, job_id)
                    )
                    events.append(_announce(db, job_id, JobEventType.CANCEL_REQUESTED, now=now))
                if row["lease_until"] is not None and row["lease_until"] <= now:
                    # Its worker stopped renewing: nobody would act on the request.
                    message = rules.CANCELLED_WORKER_LOST
                    events.append(
                        _fail_and_refund(db, job_id, kind=CANCELLED, message=message, now=now)
                    )
            ended = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            return Cancelled(_job(ended.fetchone()), tuple(e for e in events if e is not None))

    def expire_leases(self, *, now: float) -> int:
        with self._db.write() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_until = ? WHERE status = 'PROCESSING' "
                "AND (lease_until IS NULL OR lease_until > ?)",
                (now, now),
            )
            return cursor.rowcount

    def purge_expired(self, *, now: float) -> Purged:
        events: list[JobEvent] = []
        with self._db.write() as db:
            db.execute("DELETE FROM job_events WHERE expires_at <= ?", (now,))
            idempotent.purge(db, now=now)
            history.purge(db, now=now)
            while True:
                missed = _end_missed_starts(db, now=now)
                events.extend(missed)
                if len(missed) < rules.START_TIMEOUT_BATCH:
                    break
            unfinished = db.execute(
                "SELECT id, status, key_id, cost_micro, cancel_requested_at FROM jobs "
                "WHERE expires_at <= ? AND status IN ('QUEUED', 'PROCESSING')",
                (now,),
            ).fetchall()
            for row in unfinished:
                # A paid job that expired before it finished gives its money back, and whoever
                # follows the log learns that it ended.
                if row["cancel_requested_at"] is not None:
                    kind, message = CANCELLED, rules.CANCELLED_AT_EXPIRY
                elif row["status"] == JobStatus.QUEUED:
                    kind, message = EXPIRED, rules.EXPIRED_QUEUED
                else:
                    kind, message = EXPIRED, rules.EXPIRED_RUNNING
                db.execute(
                    "UPDATE api_keys SET balance_micro = balance_micro + ? WHERE id = ?",
                    (row["cost_micro"], row["key_id"]),
                )
                event = _announce(
                    db, row["id"], JobEventType.FAILED, now=now, kind=kind, message=message
                )
                if event is not None:
                    events.append(event)
            rows = db.execute(
                f"DELETE FROM jobs WHERE expires_at <= ? RETURNING {_JOB_COLUMNS}", (now,)
            ).fetchall()
        return Purged((_job(row) for row in rows), events)

    def stats(self, *, now: float) -> QueueStats:
        queued: dict[str, int] = {}
        processing: dict[str, int] = {}
        waiting: dict[str, int] = {}
        with self._db.read() as db:
            rows = db.execute(
                "SELECT slug, status, COUNT(*) AS n, "
                "SUM(progress_step IS NULL AND status = 'PROCESSING') AS waiting FROM jobs "
                "WHERE status IN ('QUEUED', 'PROCESSING') GROUP BY slug, status"
            ).fetchall()
            oldest = db.execute(
                "SELECT MIN(created_at) AS oldest FROM jobs WHERE status = 'QUEUED'"
            ).fetchone()["oldest"]
        for row in rows:
            target = queued if row["status"] == JobStatus.QUEUED else processing
            target[row["slug"]] = row["n"]
            if row["waiting"]:
                waiting[row["slug"]] = row["waiting"]
        return QueueStats(
            queued_by_model=queued,
            processing_by_model=processing,
            waiting_by_model=waiting,
            oldest_queued_age_s=max(0.0, now - oldest) if oldest is not None else None,
        )

    def queue_position(self, job_id: str, *, now: float) -> int | None:
        with self._db.read() as db:
            return fair_order.queue_position(db, job_id, now=now)

    # --- the event log ----------------------------------------------------------------------
    def events(self, *, after: str | None = None, limit: int = 100) -> list[JobEvent]:
        rows = (
            self._db.connection()
            .execute(
                f"SELECT {_EVENT_COLUMNS} FROM job_events WHERE seq > ? ORDER BY seq LIMIT ?",
                (_seq(after), limit),
            )
            .fetchall()
        )
        return [_event(row) for row in rows]

    def job_events(self, job_id: str, *, after: str | None = None) -> list[JobEvent]:
        rows = (
            self._db.connection()
            .execute(
                f"SELECT {_EVENT_COLUMNS} FROM job_events WHERE job_id = ? AND seq > ? "
                "ORDER BY seq",
                (job_id, _seq(after)),
            )
            .fetchall()
        )
        return [_event(row) for row in rows]

    def last_event_id(self) -> str | None:
        row = self._one("SELECT MAX(seq) FROM job_events", ())
        return str(row[0]) if row is not None and row[0] is not None else None
