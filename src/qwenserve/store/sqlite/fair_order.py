"""The SQLite store's queue positions in the fair order (``store.fair``), and the schema step
that keeps them.

A claim takes the waiting key with the least tag, FIFO within the key, so a job's turn comes
when its key's tag reaches the sum of the service queued before it in that key. Each job is
stamped with that *projected start* when it starts waiting (a trigger, in the submit's own
transaction): ``max(the key's tag, the virtual time, the projected finish of the key's jobs
already waiting)``, and the key's projected finish moves past it by ``service / weight``. A job
released back to the queue goes back to its key's head: its claim is undone in the key's
service (``unclaim``: it is charged once, when it runs) and it is stamped there. The claim
order is then the order of ``(projected start, key id, submit order)``, the claim's own tie
rule, and a job's position is the count of the model's QUEUED jobs before it there: a range
count of a partial index (``jobs_fair_order``) that holds QUEUED jobs only.

SQLite has no rank in O(log n), so that count costs ~0.25 µs a job ahead (5 ms at 20,000):
it is exact up to ``EXACT_POSITIONS`` jobs ahead and estimated further back, so a poll's cost
is bounded whatever the depth. The estimate sums, over the keys waiting for the model whose
turn comes before the job's (at most ``ESTIMATE_KEYS`` of them, from ``fair_active``), how many
of their jobs start before it, taking each key's queued jobs as evenly spread between its tag
and its projected finish (``fair_proj``): exact for keys whose queued jobs are alike. With more
keys ahead than that, it interpolates between the last job counted and the model's last job
by projected start (the model's QUEUED count is kept by triggers in ``slug_queued``). Either
way it stays within its bounds (at least ``EXACT_POSITIONS``, less than the model's queue).

The stamp is exact for what the claim sees when nothing changes behind it: it drifts when a
key is served for another model meanwhile (its tag is one for every model), when its weight
changes, or when its jobs are cancelled (the stamps after them stay where they were), and it
ignores ``max_running`` (a capped key's jobs count as ahead though they wait). Positions are
estimates of the fair order, never used to claim. Redis keeps the same stamps
(``helpers.lua``'s ``fair_join``) and answers with one ``ZRANK``.
"""

from __future__ import annotations

import math
import sqlite3

EXACT_POSITIONS = 1_000
"""Positions are counted exactly up to this many jobs ahead, estimated beyond."""
ESTIMATE_KEYS = 1_000
"""The most keys ahead a far-back estimate sums per key; beyond, it interpolates."""


def _stamp(row: str) -> str:
    """The statements that stamp ``row`` (NEW) with its projected start and move its key's
    projected finish; the key's other QUEUED jobs found through ``jobs_key_head``."""
    start = f"""MAX(
        COALESCE((SELECT tag FROM fair_tags WHERE key_id = {row}.key_id), 0),
        COALESCE((SELECT tag FROM fair_tags WHERE key_id = ''), 0),
        CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE key_id = {row}.key_id
                          AND status = 'QUEUED' AND id <> {row}.id)
             THEN COALESCE((SELECT proj FROM fair_proj WHERE key_id = {row}.key_id), 0)
             ELSE 0 END)"""
    return f"""
    UPDATE jobs SET fair_start = {start} WHERE id = {row}.id;
    INSERT OR REPLACE INTO fair_proj (key_id, proj) VALUES ({row}.key_id,
        (SELECT fair_start FROM jobs WHERE id = {row}.id) + {row}.service / MAX(
            COALESCE((SELECT weight FROM api_keys WHERE id = {row}.key_id), 1), 1e-6));"""


def _count_slug(trigger: str, event: str, when: str, row: str, step: str) -> str:
    return f"""
CREATE TRIGGER {trigger} AFTER {event} ON jobs WHEN {when} BEGIN
    INSERT OR IGNORE INTO slug_queued (slug, queued) VALUES ({row}.slug, 0);
    UPDATE slug_queued SET queued = queued {step} 1 WHERE slug = {row}.slug;
END
    """


MIGRATION: tuple[str, ...] = (
    # A job's projected start in the fair order (NULL: never waited since this step), each
    # key's projected finish, and the QUEUED jobs of a model in that order.
    "ALTER TABLE jobs ADD COLUMN fair_start REAL",
    "CREATE TABLE fair_proj (key_id TEXT PRIMARY KEY, proj REAL NOT NULL)",
    "CREATE INDEX jobs_fair_order ON jobs (slug, fair_start, key_id, created_at, seq) "
    "WHERE status = 'QUEUED'",
    f"""
CREATE TRIGGER jobs_fair_stamp_insert AFTER INSERT ON jobs WHEN NEW.status = 'QUEUED' BEGIN
    {_stamp("NEW")}
END
    """,
    f"""
CREATE TRIGGER jobs_fair_stamp_join AFTER UPDATE OF status ON jobs
WHEN OLD.status <> 'QUEUED' AND NEW.status = 'QUEUED' AND NEW.fair_start IS NULL BEGIN
    {_stamp("NEW")}
END
    """,
    # The jobs an upgraded file already holds wait at the start, FIFO within their key.
    "UPDATE jobs SET fair_start = 0 WHERE status = 'QUEUED'",
    # Each model's QUEUED jobs, counted as queued_counts counts each key's.
    "CREATE TABLE slug_queued (slug TEXT PRIMARY KEY, queued INTEGER NOT NULL)",
    _count_slug("jobs_slug_queued_insert", "INSERT", "NEW.status = 'QUEUED'", "NEW", "+"),
    _count_slug(
        "jobs_slug_queued_join",
        "UPDATE OF status",
        "OLD.status <> 'QUEUED' AND NEW.status = 'QUEUED'",
        "NEW",
        "+",
    ),
    _count_slug(
        "jobs_slug_queued_leave",
        "UPDATE OF status",
        "OLD.status = 'QUEUED' AND NEW.status <> 'QUEUED'",
        "OLD",
        "-",
    ),
    _count_slug("jobs_slug_queued_delete", "DELETE", "OLD.status = 'QUEUED'", "OLD", "-"),
    "INSERT INTO slug_queued (slug, queued) "
    "SELECT slug, COUNT(*) FROM jobs WHERE status = 'QUEUED' GROUP BY slug",
)
"""Projected starts for queue positions in the fair order (schema version 8)."""


def unclaim(db: sqlite3.Connection, job_id: str) -> None:
    """Inside the release's write transaction, after the job is QUEUED again: its claim is
    undone in its key's service (the tag moves back by ``service / weight``: it is charged
    when claimed again, not twice), and it is stamped at its key's head, where it waits."""
    row = db.execute(
        "SELECT j.key_id, j.service, COALESCE(k.weight, 1) AS weight FROM jobs j "
        "LEFT JOIN api_keys k ON k.id = j.key_id WHERE j.id = ?",
        (job_id,),
    ).fetchone()
    if row is None:
        return
    tags = dict(
        db.execute(
            "SELECT key_id, tag FROM fair_tags WHERE key_id IN (?, '')", (row["key_id"],)
        ).fetchall()
    )
    tag = max(tags.get(row["key_id"], 0.0) - row["service"] / max(row["weight"], 1e-6), 0.0)
    db.execute(
        "INSERT INTO fair_tags (key_id, tag) VALUES (?, ?) "
        "ON CONFLICT (key_id) DO UPDATE SET tag = excluded.tag",
        (row["key_id"], tag),
    )
    db.execute("UPDATE fair_active SET tag = MIN(tag, ?) WHERE key_id = ?", (tag, row["key_id"]))
    db.execute("UPDATE jobs SET fair_start = ? WHERE id = ?", (max(tag, tags.get("", 0.0)), job_id))


_ORDER = "FROM jobs INDEXED BY jobs_fair_order WHERE status = 'QUEUED' AND slug = ?"


def queue_position(
    db: sqlite3.Connection,
    job_id: str,
    *,
    now: float,
    exact_up_to: int = EXACT_POSITIONS,
    estimate_keys: int = ESTIMATE_KEYS,
) -> int | None:
    """How many QUEUED jobs of the same model the fair claim takes before this one (0: next);
    None when it is not QUEUED (or unknown, or expired). Exact up to ``exact_up_to`` jobs
    ahead, estimated beyond from up to ``estimate_keys`` keys (see the module docstring)."""
    job = db.execute(
        "SELECT seq, slug, key_id, status, created_at, expires_at, fair_start FROM jobs "
        "WHERE id = ?",
        (job_id,),
    ).fetchone()
    if job is None or job["status"] != "QUEUED" or job["expires_at"] <= now:
        return None
    slug, start = job["slug"], job["fair_start"] if job["fair_start"] is not None else 0.0
    ahead: int = db.execute(
        f"SELECT COUNT(*) FROM (SELECT 1 {_ORDER} "
        "AND (fair_start, key_id, created_at, seq) < (?, ?, ?, ?) LIMIT ?)",
        (slug, start, job["key_id"], job["created_at"], job["seq"], exact_up_to),
    ).fetchone()[0]
    if ahead < exact_up_to:
        return ahead
    total = db.execute("SELECT queued FROM slug_queued WHERE slug = ?", (slug,)).fetchone()
    count = int(total["queued"]) if total is not None else ahead + 1
    estimate = _per_key_estimate(db, slug, start, estimate_keys)
    if estimate is None:
        estimate = _interpolated(db, slug, start, exact_up_to, count)
    return max(exact_up_to, min(estimate, count - 1))


def _per_key_estimate(
    db: sqlite3.Connection, slug: str, start: float, most_keys: int
) -> int | None:
    """Jobs of ``slug`` that start before ``start``, summed per waiting key (each key's queued
    jobs spread evenly from its head to its projected finish); None past ``most_keys``."""
    rows = db.execute(
        "SELECT a.tag, a.queued, p.proj FROM fair_active a INDEXED BY fair_active_pick "
        "LEFT JOIN fair_proj p ON p.key_id = a.key_id "
        "WHERE a.slug = ? AND a.queued > 0 AND a.tag < ? ORDER BY a.tag LIMIT ?",
        (slug, start, most_keys + 1),
    ).fetchall()
    if len(rows) > most_keys:
        return None
    virtual = db.execute("SELECT tag FROM fair_tags WHERE key_id = ''").fetchone()
    floor = float(virtual["tag"]) if virtual is not None else 0.0
    before = 0
    for row in rows:
        head, queued = max(float(row["tag"]), floor), int(row["queued"])
        if head >= start:
            continue
        proj = float(row["proj"]) if row["proj"] is not None else head
        if proj <= head:
            before += queued
            continue
        span = (proj - head) / queued  # one job's share of the key's projected work
        before += min(queued, math.ceil((start - head) / span - 1e-9))
    return before


def _interpolated(
    db: sqlite3.Connection, slug: str, start: float, exact_up_to: int, count: int
) -> int:
    """Between the last job counted (at ``exact_up_to - 1``) and the model's last, linear in
    projected start."""
    edge = db.execute(
        f"SELECT fair_start {_ORDER} ORDER BY fair_start, key_id, created_at, seq LIMIT 1 OFFSET ?",
        (slug, exact_up_to - 1),
    ).fetchone()
    last = db.execute(
        f"SELECT fair_start {_ORDER} "
        "ORDER BY fair_start DESC, key_id DESC, created_at DESC, seq DESC LIMIT 1",
        (slug,),
    ).fetchone()
    if edge is None or last is None:
        return exact_up_to
    low, high = float(edge[0] or 0.0), float(last[0] or 0.0)
    fraction = (start - low) / (high - low) if high > low else 1.0
    return exact_up_to - 1 + round(min(max(fraction, 0.0), 1.0) * (count - exact_up_to))
