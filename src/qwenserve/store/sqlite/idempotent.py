"""Idempotency keys in SQLite: read and written inside the submit's own write transaction.

A row per (API key, ``Idempotency-Key``) names the job the first submit created and the hash of
its body. Submit looks it up first (under the write lock, so two duplicates cannot both miss
it) and inserts it with the job, so either both are kept or neither is.
"""

from __future__ import annotations

import sqlite3

from qwenserve.store import rules
from qwenserve.store.base import Idempotency, SubmitOutcome


def replay_of(
    db: sqlite3.Connection, key_id: str, idempotency: Idempotency, *, now: float
) -> str | None:
    """Inside a write transaction: the job id a live record of this key names (None: no record,
    or it expired).

    Raises:
        Conflict: the record was made with another body.
    """
    row = db.execute(
        "SELECT body_hash, job_id FROM idempotency WHERE key_id = ? AND idem_key = ? "
        "AND expires_at > ?",
        (key_id, idempotency.key, now),
    ).fetchone()
    if row is None:
        return None
    job_id: str = row["job_id"]
    if row["body_hash"] != idempotency.body_hash:
        job = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        raise rules.idempotency_mismatch(job_id, job["status"] if job is not None else "EXPIRED")
    return job_id


def record(
    db: sqlite3.Connection, key_id: str, idempotency: Idempotency, job_id: str, *, now: float
) -> None:
    """Inside the submit's write transaction: remember the key for ``IDEMPOTENCY_TTL_S``
    (replacing an expired record of the same key)."""
    db.execute(
        "INSERT OR REPLACE INTO idempotency (key_id, idem_key, body_hash, job_id, expires_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (key_id, idempotency.key, idempotency.body_hash, job_id, now + rules.IDEMPOTENCY_TTL_S),
    )


def purge(db: sqlite3.Connection, *, now: float) -> None:
    """Inside a write transaction: forget records past their TTL."""
    db.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))


def replayed(key: sqlite3.Row, job_id: str, *, rpm: int, now: float) -> SubmitOutcome:
    """The outcome of a replay: the key's figures as they are, nothing charged or counted."""
    remaining: int | None = None
    if rpm > 0:
        window_start: float | None = key["window_start"]
        fresh = window_start is None or now >= window_start + rules.RATE_WINDOW_S
        remaining = rpm if fresh else max(rpm - int(key["window_count"]), 0)
    return SubmitOutcome(
        remaining_usd=rules.to_usd(key["balance_micro"]),
        rate_limit_remaining=remaining,
        replay_of=job_id,
    )
