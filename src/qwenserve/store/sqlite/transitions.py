"""The SQLite store's transitions shared by its steps: the event log entry (with the history
record following it) and the ending of a job as failed with its refund. Each runs inside the
caller's write transaction, so it commits with the change it records."""

from __future__ import annotations

import sqlite3

from qwenserve.jobs import JobEvent, JobEventType
from qwenserve.store import rules
from qwenserve.store.records import EVENT_FIELDS, event_from_record
from qwenserve.store.sqlite import history

_RETURNING = "RETURNING seq, " + ", ".join(EVENT_FIELDS)


def announce(
    db: sqlite3.Connection,
    job_id: str,
    event: JobEventType,
    *,
    now: float,
    kind: str | None = None,
    message: str | None = None,
    charged: bool = False,
) -> JobEvent | None:
    """Inside a write transaction: append ``event`` for the job to the log, kept for the job's
    result TTL from now (``charged``: a failure that keeps its charge, for its history); returns
    the event appended (None: no such job)."""
    row = db.execute(
        "INSERT INTO job_events (job_id, key_id, slug, type, at, attempt, error_kind, error, "
        "expires_at) SELECT id, key_id, slug, ?, ?, attempts, ?, ?, ? + (expires_at - created_at) "
        f"FROM jobs WHERE id = ? {_RETURNING}",
        (event.value, now, kind, message, now, job_id),
    ).fetchone()
    history.transition(db, job_id, event, now=now, message=message, charged=charged)
    return event_from_record(str(row["seq"]), dict(row)) if row is not None else None


def fail_and_refund(
    db: sqlite3.Connection,
    job_id: str,
    *,
    kind: str,
    message: str,
    now: float,
    refund: bool = True,
) -> JobEvent | None:
    """Inside a write transaction: a non-terminal job → FAILED, its cost back to the key
    (unless not ``refund``), the ending announced; returns its ``failed`` event. None when the
    job had already ended."""
    row = db.execute(
        "UPDATE jobs SET status = 'FAILED', error = ?, error_kind = ?, finished_at = ?, "
        "lease_until = NULL WHERE id = ? AND status IN ('QUEUED', 'PROCESSING') "
        "RETURNING key_id, cost_micro",
        (message, kind, now, job_id),
    ).fetchone()
    if row is None:
        return None
    if refund and row["cost_micro"]:
        db.execute(
            "UPDATE api_keys SET balance_micro = balance_micro + ? WHERE id = ?",
            (row["cost_micro"], row["key_id"]),
        )
        # The job's cost is what its key is charged now (a refunded failure: 0, as its history).
        db.execute("UPDATE jobs SET cost_micro = 0 WHERE id = ?", (job_id,))
    return announce(
        db, job_id, JobEventType.FAILED, now=now, kind=kind, message=message, charged=not refund
    )


def check_queue_limits(
    db: sqlite3.Connection, key_id: str, max_queued: int, key_max_queued: int
) -> None:
    """Inside the submit's transaction: refuse a job past the cluster's or the key's limit on
    QUEUED jobs (0: none), so the count cannot change between the check and the insert. The
    counts are the ``queued_counts`` rows the schema's triggers keep (``''``: all keys)."""
    for limit, counted, refusal in (
        (max_queued, "", rules.queue_full),
        (key_max_queued, key_id, rules.key_queue_full),
    ):
        if limit > 0:
            row = db.execute(
                "SELECT queued FROM queued_counts WHERE key_id = ?", (counted,)
            ).fetchone()
            if row is not None and row["queued"] >= limit:
                raise refusal(limit)


def end_missed_starts(db: sqlite3.Connection, *, now: float) -> list[JobEvent]:
    """Inside a write transaction: QUEUED jobs that never started and whose start deadline has
    passed end FAILED (``start_timeout``), refunded, announced; returns their endings (at most
    ``rules.START_TIMEOUT_BATCH``). A job released back to the queue after its first attempt
    (``started_at`` cleared) is waiting again, so its deadline holds again."""
    rows = db.execute(
        # INDEXED BY: the planner would otherwise walk every QUEUED job (jobs_claim) on each
        # claim, making the claim linear in queue depth.
        "SELECT id FROM jobs INDEXED BY jobs_start_by "
        "WHERE start_by IS NOT NULL AND status = 'QUEUED' AND start_by <= ? "
        "AND started_at IS NULL ORDER BY start_by LIMIT ?",
        (now, rules.START_TIMEOUT_BATCH),
    ).fetchall()
    ended = []
    for row in rows:
        event = fail_and_refund(
            db,
            row["id"],
            kind=rules.START_TIMEOUT_KIND,
            message=rules.START_TIMEOUT_MESSAGE,
            now=now,
        )
        if event is not None:
            ended.append(event)
    return ended
