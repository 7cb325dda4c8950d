"""Request history in SQLite: written inside the transactions that change the job.

``insert`` runs in submit's transaction; ``transition`` in ``transitions.announce``, i.e. in the
same transaction as every status change the event log records (claims, completions, failures with
their refund, expiry). See ``store/history.py`` for what a record holds.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from qwenserve.jobs import Job, JobEventType, JobStatus
from qwenserve.store import rules
from qwenserve.store.history import (
    DAY_S,
    HistoryFilter,
    HistoryPage,
    HistoryPolicy,
    HistoryRecord,
    UsageRow,
    day_number,
    day_text,
    decode_cursor,
    encode_cursor,
    prompt_of,
)
from qwenserve.store.sqlite.connection import SqliteDatabase

_COLUMNS = (
    "job_id, key_id, slug, status, created_at, finished_at, cost_micro, inference_time_s, "
    "error, prompt"
)


def insert(db: sqlite3.Connection, job: Job, policy: HistoryPolicy) -> None:
    """Inside submit's transaction: the request's record, QUEUED and charged."""
    db.execute(
        f"INSERT OR IGNORE INTO history ({_COLUMNS}, expires_at) "
        "VALUES (?, ?, ?, 'QUEUED', ?, NULL, ?, NULL, NULL, ?, ?)",
        (
            job.id,
            job.key_id,
            job.slug,
            job.created_at,
            rules.to_micro(job.cost_usd),
            prompt_of(job.request, policy),
            job.created_at + policy.ttl_s,
        ),
    )


def transition(
    db: sqlite3.Connection,
    job_id: str,
    event: JobEventType,
    *,
    now: float,
    message: str | None,
    charged: bool = False,
) -> None:
    """Inside the transaction of a job's transition: its record follows (a failure is refunded
    in the same step, so it costs 0, unless ``charged``)."""
    if event is JobEventType.COMPLETED:
        row = db.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
        result: dict[str, Any] = json.loads(row["result"]) if row and row["result"] else {}
        db.execute(
            "UPDATE history SET status = 'COMPLETED', finished_at = ?, inference_time_s = ? "
            "WHERE job_id = ?",
            (now, result.get("inference_time_s"), job_id),
        )
    elif event is JobEventType.FAILED:
        db.execute(
            "UPDATE history SET status = 'FAILED', finished_at = ?, error = ?, "
            "cost_micro = CASE WHEN ? THEN cost_micro ELSE 0 END WHERE job_id = ?",
            (now, message, charged, job_id),
        )
    elif event in (JobEventType.QUEUED, JobEventType.PROCESSING):
        status = JobStatus[event.name].value
        db.execute("UPDATE history SET status = ? WHERE job_id = ?", (status, job_id))


def purge(db: sqlite3.Connection, *, now: float) -> None:
    db.execute("DELETE FROM history WHERE expires_at <= ?", (now,))


def _record(row: sqlite3.Row) -> HistoryRecord:
    return HistoryRecord(
        request_id=row["job_id"],
        key_id=row["key_id"],
        slug=row["slug"],
        status=row["status"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        cost_usd=rules.to_usd(row["cost_micro"]),
        inference_time_s=row["inference_time_s"],
        error=row["error"],
        prompt=row["prompt"],
    )


def page(
    db: sqlite3.Connection, key_id: str, *, limit: int, cursor: str | None, where: HistoryFilter
) -> HistoryPage:
    sql = f"SELECT {_COLUMNS} FROM history WHERE key_id = ?"
    args: list[object] = [key_id]
    if cursor is not None:
        created, request_id = decode_cursor(cursor)
        sql += " AND (created_at < ? OR (created_at = ? AND job_id < ?))"
        args += [created, created, request_id]
    for clause, value in (
        (" AND status = ?", where.status),
        (" AND slug = ?", where.model),
        (" AND created_at >= ?", where.since),
        (" AND created_at < ?", where.until),
    ):
        if value is not None:
            sql += clause
            args.append(value)
    sql += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
    rows = db.execute(sql, (*args, limit + 1)).fetchall()
    records = [_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    last = records[-1] if records else None
    return HistoryPage(
        records=records,
        next_cursor=encode_cursor(last.created_at, last.request_id) if more and last else None,
    )


def usage(
    db: sqlite3.Connection, key_id: str | None, *, since: float, until: float
) -> list[UsageRow]:
    first, last = day_number(since) * DAY_S, (day_number(until) + 1) * DAY_S
    sql = (
        "SELECT CAST(created_at / 86400 AS INTEGER) AS day, key_id, slug, COUNT(*) AS n, "
        "SUM(cost_micro) AS cost, SUM(COALESCE(inference_time_s, 0)) AS gpu FROM history "
        "WHERE created_at >= ? AND created_at < ?"
    )
    args: list[object] = [first, last]
    if key_id is not None:
        sql += " AND key_id = ?"
        args.append(key_id)
    sql += " GROUP BY day, key_id, slug ORDER BY day, key_id, slug"
    return [
        UsageRow(
            day=day_text(row["day"]),
            key_id=row["key_id"],
            model=row["slug"],
            count=row["n"],
            cost_usd=rules.to_usd(row["cost"]),
            gpu_seconds=float(row["gpu"]),
        )
        for row in db.execute(sql, args).fetchall()
    ]


class SqliteHistory:
    """``Store.history`` and ``Store.usage`` over ``self._db`` (the store's database)."""

    _db: SqliteDatabase

    def history(
        self,
        key_id: str,
        *,
        limit: int,
        cursor: str | None = None,
        where: HistoryFilter = HistoryFilter(),  # noqa: B008 - frozen
    ) -> HistoryPage:
        with self._db.read() as db:
            return page(db, key_id, limit=limit, cursor=cursor, where=where)

    def usage(self, key_id: str | None, *, since: float, until: float) -> list[UsageRow]:
        with self._db.read() as db:
            return usage(db, key_id, since=since, until=until)
