"""The SQLite store's transitions shared by its steps: the event log entry (with the history
record following it) and the ending of a job as failed with its refund. Each runs inside the
caller's write transaction, so it commits with the change it records."""

from __future__ import annotations

import sqlite3

from qwenserve.jobs import JobEventType
from qwenserve.store.sqlite import history


def announce(
    db: sqlite3.Connection,
    job_id: str,
    event: JobEventType,
    *,
    now: float,
    kind: str | None = None,
    message: str | None = None,
    charged: bool = False,
) -> None:
    """Inside a write transaction: append ``event`` for the job to the log, kept for the job's
    result TTL from now (``charged``: a failure that keeps its charge, for its history)."""
    db.execute(
        "INSERT INTO job_events (job_id, key_id, slug, type, at, attempt, error_kind, error, "
        "expires_at) SELECT id, key_id, slug, ?, ?, attempts, ?, ?, ? + (expires_at - created_at) "
        "FROM jobs WHERE id = ?",
        (event.value, now, kind, message, now, job_id),
    )
    history.transition(db, job_id, event, now=now, message=message, charged=charged)


def fail_and_refund(
    db: sqlite3.Connection,
    job_id: str,
    *,
    kind: str,
    message: str,
    now: float,
    refund: bool = True,
) -> bool:
    """Inside a write transaction: a non-terminal job → FAILED, its cost back to the key
    (unless not ``refund``), the ending announced. False when the job had already ended."""
    row = db.execute(
        "UPDATE jobs SET status = 'FAILED', error = ?, error_kind = ?, finished_at = ?, "
        "lease_until = NULL WHERE id = ? AND status IN ('QUEUED', 'PROCESSING') "
        "RETURNING key_id, cost_micro",
        (message, kind, now, job_id),
    ).fetchone()
    if row is None:
        return False
    if refund and row["cost_micro"]:
        db.execute(
            "UPDATE api_keys SET balance_micro = balance_micro + ? WHERE id = ?",
            (row["cost_micro"], row["key_id"]),
        )
    announce(
        db, job_id, JobEventType.FAILED, now=now, kind=kind, message=message, charged=not refund
    )
    return True
