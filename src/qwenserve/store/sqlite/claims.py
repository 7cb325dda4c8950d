"""The SQLite store's claim: expired leases first, then weighted fair queuing between keys.

Runs inside the claim's write transaction. Every read is an index head, so the cost stays flat
in queue depth and key count: the least-tag waiting key of each model asked for
(``fair_active_pick``; ``fair_active_any`` for every model), then that key's oldest job
(``jobs_key_head``). Keys at their ``max_running`` are skipped where they stand (a cost in the
number of capped keys only). The rules are ``store.fair``'s; Redis's ``claim.lua`` is the twin.
"""

from __future__ import annotations

import sqlite3

from qwenserve.jobs import CANCELLED, JobEvent, JobEventType
from qwenserve.store import fair, rules
from qwenserve.store.sqlite.transitions import announce, end_missed_starts, fail_and_refund

_UNDER_CAP = (
    "(COALESCE(k.max_running, 0) = 0 OR COALESCE((SELECT running FROM running_counts r "
    "WHERE r.key_id = a.key_id), 0) < k.max_running)"
)
_PICK = (
    "SELECT a.key_id, a.slug, a.tag FROM fair_active a LEFT JOIN api_keys k ON k.id = a.key_id "
    "WHERE {where} AND a.queued > 0 AND " + _UNDER_CAP + " ORDER BY a.tag, a.key_id LIMIT 1"
)


def claim_jobs(
    db: sqlite3.Connection,
    worker_id: str,
    *,
    slugs: list[str] | None,
    lease_s: float,
    max_attempts: int,
    now: float,
    limit: int,
) -> tuple[list[str], list[JobEvent]]:
    """Claim up to ``limit`` jobs of ``slugs`` (None: any) for ``worker_id``; their ids, in the
    order taken, and every event appended (each job ended on the way, each claim). A job whose
    lease ran out goes first (its share was granted when first taken)."""
    claimed: list[str] = []
    events = end_missed_starts(db, now=now)
    slug_filter = f" AND slug IN ({', '.join('?' * len(slugs))})" if slugs is not None else ""
    # Jobs ended on the way leave the leased set, so the loop ends: each pass either claims or
    # ends every row it read.
    while len(claimed) < limit:
        rows = db.execute(
            "SELECT id, attempts, cancel_requested_at FROM jobs WHERE status = 'PROCESSING' "
            f"AND lease_until <= ?{slug_filter} ORDER BY created_at, seq LIMIT ?",
            (now, *(slugs or ()), limit - len(claimed)),
        ).fetchall()
        if not rows:
            break
        for row in rows:
            if row["cancel_requested_at"] is not None:
                appended = fail_and_refund(
                    db, row["id"], kind=CANCELLED, message=rules.CANCELLED_WORKER_LOST, now=now
                )
            elif row["attempts"] >= max_attempts:
                message = rules.gave_up_message(row["attempts"], max_attempts)
                appended = fail_and_refund(
                    db, row["id"], kind=rules.GIVE_UP_KIND, message=message, now=now
                )
            else:
                appended = _take(db, row["id"], worker_id, lease_until=now + lease_s, now=now)
                claimed.append(row["id"])
            if appended is not None:
                events.append(appended)
    while len(claimed) < limit:
        pick = _pick(db, slugs)
        if pick is None:
            break
        key_id, slug, tag = pick
        head = db.execute(
            "SELECT id, service FROM jobs WHERE key_id = ? AND slug = ? AND status = 'QUEUED' "
            "ORDER BY created_at, seq LIMIT 1",
            (key_id, slug),
        ).fetchone()
        if head is None:  # the count drifted from the jobs (cannot by the triggers): mend it
            db.execute(
                "UPDATE fair_active SET queued = 0 WHERE key_id = ? AND slug = ?", (key_id, slug)
            )
            continue
        taken = _take(db, head["id"], worker_id, lease_until=now + lease_s, now=now)
        if taken is not None:
            events.append(taken)
        _charge(db, key_id, tag, head["service"])
        claimed.append(head["id"])
    return claimed, events


def _pick(db: sqlite3.Connection, slugs: list[str] | None) -> tuple[str, str, float] | None:
    """The waiting (key, model) whose key has the least tag, among keys under their cap."""
    if slugs is None:
        row = db.execute(_PICK.format(where="1")).fetchone()
        return (row["key_id"], row["slug"], row["tag"]) if row is not None else None
    best: tuple[str, str, float] | None = None
    for slug in slugs:
        row = db.execute(_PICK.format(where="a.slug = ?"), (slug,)).fetchone()
        if row is not None and (best is None or (row["tag"], row["key_id"]) < (best[2], best[0])):
            best = (row["key_id"], row["slug"], row["tag"])
    return best


def _take(
    db: sqlite3.Connection, job_id: str, worker_id: str, *, lease_until: float, now: float
) -> JobEvent | None:
    db.execute(
        "UPDATE jobs SET status = 'PROCESSING', worker_id = ?, lease_until = ?, "
        "attempts = attempts + 1, started_at = COALESCE(started_at, ?), "
        "progress_step = NULL, progress_total = NULL, progress_at = NULL WHERE id = ?",
        (worker_id, lease_until, now, job_id),
    )
    return announce(db, job_id, JobEventType.PROCESSING, now=now)


def _charge(db: sqlite3.Connection, key_id: str, tag: float, service: float) -> None:
    """Move the key's tag and the virtual time past the job just taken (``fair.next_tag``)."""
    row = db.execute("SELECT weight FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    weight = float(row["weight"]) if row is not None else 1.0
    tags = dict(
        db.execute(
            "SELECT key_id, tag FROM fair_tags WHERE key_id IN (?, '')", (key_id,)
        ).fetchall()
    )
    new_tag, virtual = fair.next_tag(
        max(tag, tags.get(key_id, 0.0)), tags.get("", 0.0), service, weight
    )
    db.executemany(
        "INSERT INTO fair_tags (key_id, tag) VALUES (?, ?) "
        "ON CONFLICT (key_id) DO UPDATE SET tag = excluded.tag",
        ((key_id, new_tag), ("", virtual)),
    )
    db.execute("UPDATE fair_active SET tag = ? WHERE key_id = ?", (new_tag, key_id))
