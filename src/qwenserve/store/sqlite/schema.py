"""The SQLite schema as an ordered list of migrations, applied in one transaction on open.

``schema_version`` holds the version a file is at. Opening runs every step above it, in order,
then records ``SCHEMA_VERSION``, all in the one ``BEGIN IMMEDIATE`` transaction (SQLite's DDL is
transactional), so a crash mid-upgrade leaves the file at its old version, intact. A fresh file
runs every step from version 0, so the upgrade path is the path every new install takes too. A
file newer than this code is refused (an older qwenserve refuses ours the same way).

A step is never edited once released: change the schema by appending one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from qwenserve.errors import QwenServeError
from qwenserve.store.sqlite import fair_order

_V1: tuple[str, ...] = (
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
"""The first released schema: keys (money in micro-USD, the rate window) and jobs."""

_V2: tuple[str, ...] = (
    # Job control: the running attempt's progress and a pending cancel request.
    "ALTER TABLE jobs ADD COLUMN progress_step INTEGER",
    "ALTER TABLE jobs ADD COLUMN progress_total INTEGER",
    "ALTER TABLE jobs ADD COLUMN progress_at REAL",
    "ALTER TABLE jobs ADD COLUMN cancel_requested_at REAL",
    # The event log. AUTOINCREMENT: a seq is never reused after the log is trimmed, so a
    # consumer resuming after seq N can never miss a later event that got N again.
    """
CREATE TABLE job_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    slug            TEXT NOT NULL,
    type            TEXT NOT NULL,          -- JobEventType
    at              REAL NOT NULL,
    attempt         INTEGER NOT NULL,
    error_kind      TEXT,
    error           TEXT,
    expires_at      REAL NOT NULL           -- trimmed from then on (at + the job's result TTL)
)
    """,
    "CREATE INDEX job_events_job ON job_events (job_id, seq)",
    "CREATE INDEX job_events_expiry ON job_events (expires_at)",
    # Job.extra was never used. DROP COLUMN needs SQLite 3.35; an older one keeps the unused
    # column (it has a default, and every INSERT names its columns).
    *(("ALTER TABLE jobs DROP COLUMN extra",) if sqlite3.sqlite_version_info >= (3, 35) else ()),
)
"""Progress, cancel requests and the durable event log; ``extra`` dropped."""

_V3: tuple[str, ...] = (
    # Idempotency keys: one row per (API key, Idempotency-Key), written in the submit's own
    # transaction; the primary key is what makes concurrent duplicates race to one job.
    """
CREATE TABLE idempotency (
    key_id          TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    body_hash       TEXT NOT NULL,
    job_id          TEXT NOT NULL,
    expires_at      REAL NOT NULL,
    PRIMARY KEY (key_id, idem_key)
)
    """,
    "CREATE INDEX idempotency_expiry ON idempotency (expires_at)",
)
"""Idempotency keys (24 h)."""


_V4: tuple[str, ...] = (
    # Webhooks: where a job's ending is POSTed, each key's signing secret, the deliveries.
    "ALTER TABLE jobs ADD COLUMN webhook_url TEXT",
    "ALTER TABLE api_keys ADD COLUMN webhook_secret TEXT",
    """
CREATE TABLE webhook_deliveries (
    job_id          TEXT PRIMARY KEY,       -- one delivery per job ending
    event_id        TEXT NOT NULL,          -- the ending's event id: the webhook-id header
    key_id          TEXT NOT NULL,
    url             TEXT NOT NULL,
    status          TEXT NOT NULL,          -- pending, delivered, failed
    created_at      REAL NOT NULL,
    attempts        TEXT NOT NULL DEFAULT '[]',  -- JSON list of {at, status_code | error}
    next_attempt_at REAL,                   -- due from then on (pending only)
    owner           TEXT,                   -- the dispatcher holding the lease
    lease_until     REAL,
    body            TEXT,                   -- the JSON sent, kept from the first attempt
    expires_at      REAL NOT NULL
)
    """,
    "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at)",
    "CREATE TABLE webhook_cursor (id INTEGER PRIMARY KEY CHECK (id = 1), after TEXT)",
)
"""Webhooks: the job's URL, the key's secret, deliveries and the dispatchers' log cursor."""

_V5: tuple[str, ...] = (
    # Request history: a slim record per request that outlives the job (no output), kept in
    # step with it by the same transactions (store/sqlite/history.py).
    """
CREATE TABLE history (
    job_id          TEXT PRIMARY KEY,
    key_id          TEXT NOT NULL,
    slug            TEXT NOT NULL,
    status          TEXT NOT NULL,
    created_at      REAL NOT NULL,
    finished_at     REAL,
    cost_micro      INTEGER NOT NULL,       -- charged now: 0 once refunded
    inference_time_s REAL,
    error           TEXT,
    prompt          TEXT,                   -- only with HISTORY_KEEP_PROMPTS
    expires_at      REAL NOT NULL
)
    """,
    "CREATE INDEX history_key ON history (key_id, created_at, job_id)",
    "CREATE INDEX history_expiry ON history (expires_at)",
    # The jobs an upgraded file still holds get their records (kept the default 30 days).
    """
INSERT INTO history (job_id, key_id, slug, status, created_at, finished_at, cost_micro,
    inference_time_s, error, prompt, expires_at)
SELECT id, key_id, slug, status, created_at, finished_at,
    CASE WHEN status = 'FAILED' THEN 0 ELSE cost_micro END,
    json_extract(result, '$.inference_time_s'), error, NULL, created_at + 2592000
FROM jobs
    """,
)
"""Request history (GET /v2/requests, GET /v1/usage), with records for the jobs already there."""


def _count_queued(trigger: str, event: str, when: str, row: str, step: str) -> str:
    return f"""
CREATE TRIGGER {trigger} AFTER {event} ON jobs WHEN {when} BEGIN
    INSERT OR IGNORE INTO queued_counts (key_id, queued) VALUES ({row}.key_id, 0);
    UPDATE queued_counts SET queued = queued {step} 1 WHERE key_id IN ({row}.key_id, '');
END
    """


_V6: tuple[str, ...] = (
    # Backpressure: a key's limit on its queued jobs (0: none). QUEUED jobs are counted per key
    # (and in all, under key_id '') by triggers, in the transaction of every change of a job's
    # status whichever step makes it, so a submit's check reads two rows, whatever the depth.
    "ALTER TABLE api_keys ADD COLUMN max_queued INTEGER NOT NULL DEFAULT 0",
    "CREATE TABLE queued_counts (key_id TEXT PRIMARY KEY, queued INTEGER NOT NULL)",
    "INSERT INTO queued_counts (key_id, queued) VALUES ('', 0)",
    _count_queued("jobs_queued_insert", "INSERT", "NEW.status = 'QUEUED'", "NEW", "+"),
    _count_queued(
        "jobs_queued_join",
        "UPDATE OF status",
        "OLD.status <> 'QUEUED' AND NEW.status = 'QUEUED'",
        "NEW",
        "+",
    ),
    _count_queued(
        "jobs_queued_leave",
        "UPDATE OF status",
        "OLD.status = 'QUEUED' AND NEW.status <> 'QUEUED'",
        "OLD",
        "-",
    ),
    _count_queued("jobs_queued_delete", "DELETE", "OLD.status = 'QUEUED'", "OLD", "-"),
    # The jobs an upgraded file already holds.
    "INSERT INTO queued_counts (key_id, queued) "
    "SELECT key_id, COUNT(*) FROM jobs WHERE status = 'QUEUED' GROUP BY key_id",
    "UPDATE queued_counts SET queued = (SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED') "
    "WHERE key_id = ''",
    # Start deadlines (X-Start-Timeout): only the queued jobs that have one are indexed.
    "ALTER TABLE jobs ADD COLUMN start_by REAL",
    "CREATE INDEX jobs_start_by ON jobs (start_by) "
    "WHERE start_by IS NOT NULL AND status = 'QUEUED'",
)
"""A key's ``max_queued`` and a job's ``start_by``."""


def _count_fair(trigger: str, event: str, when: str, row: str, step: str) -> str:
    # A (key, model) pair that starts waiting joins at max(its key's tag, the virtual time).
    return f"""
CREATE TRIGGER {trigger} AFTER {event} ON jobs WHEN {when} BEGIN
    INSERT OR IGNORE INTO fair_active (key_id, slug, queued, tag)
        VALUES ({row}.key_id, {row}.slug, 0, 0);
    UPDATE fair_active SET
        tag = CASE WHEN queued = 0 AND {step} 1 > 0 THEN MAX(tag,
            COALESCE((SELECT MAX(tag) FROM fair_tags WHERE key_id IN ({row}.key_id, '')), 0))
            ELSE tag END,
        queued = queued {step} 1
    WHERE key_id = {row}.key_id AND slug = {row}.slug;
END
    """


def _count_running(trigger: str, event: str, when: str, row: str, step: str) -> str:
    return f"""
CREATE TRIGGER {trigger} AFTER {event} ON jobs WHEN {when} BEGIN
    INSERT OR IGNORE INTO running_counts (key_id, running) VALUES ({row}.key_id, 0);
    UPDATE running_counts SET running = running {step} 1 WHERE key_id = {row}.key_id;
END
    """


_V7: tuple[str, ...] = (
    # Fair queuing (store/fair.py): a key's weight and cap on running jobs, a job's estimated
    # service, each key's tag ('' holds the virtual time), and per (key, model) the QUEUED
    # count with the key's tag, kept by triggers like queued_counts so a claim reads index
    # heads only: the least-tag waiting key of a model, then that key's oldest job.
    "ALTER TABLE api_keys ADD COLUMN weight REAL NOT NULL DEFAULT 1",
    "ALTER TABLE api_keys ADD COLUMN max_running INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN service REAL NOT NULL DEFAULT 1",
    "CREATE TABLE fair_tags (key_id TEXT PRIMARY KEY, tag REAL NOT NULL)",
    """
CREATE TABLE fair_active (
    key_id          TEXT NOT NULL,
    slug            TEXT NOT NULL,
    queued          INTEGER NOT NULL,
    tag             REAL NOT NULL,          -- the key's tag when it was last served or joined
    PRIMARY KEY (key_id, slug)
)
    """,
    "CREATE INDEX fair_active_pick ON fair_active (slug, tag, key_id) WHERE queued > 0",
    "CREATE INDEX fair_active_any ON fair_active (tag, key_id) WHERE queued > 0",
    "CREATE TABLE running_counts (key_id TEXT PRIMARY KEY, running INTEGER NOT NULL)",
    "CREATE INDEX jobs_key_head ON jobs (key_id, slug, created_at, seq) WHERE status = 'QUEUED'",
    "CREATE INDEX jobs_leased ON jobs (lease_until) WHERE status = 'PROCESSING'",
    _count_fair("jobs_fair_insert", "INSERT", "NEW.status = 'QUEUED'", "NEW", "+"),
    _count_fair(
        "jobs_fair_join",
        "UPDATE OF status",
        "OLD.status <> 'QUEUED' AND NEW.status = 'QUEUED'",
        "NEW",
        "+",
    ),
    _count_fair(
        "jobs_fair_leave",
        "UPDATE OF status",
        "OLD.status = 'QUEUED' AND NEW.status <> 'QUEUED'",
        "OLD",
        "-",
    ),
    _count_fair("jobs_fair_delete", "DELETE", "OLD.status = 'QUEUED'", "OLD", "-"),
    _count_running("jobs_running_insert", "INSERT", "NEW.status = 'PROCESSING'", "NEW", "+"),
    _count_running(
        "jobs_running_join",
        "UPDATE OF status",
        "OLD.status <> 'PROCESSING' AND NEW.status = 'PROCESSING'",
        "NEW",
        "+",
    ),
    _count_running(
        "jobs_running_leave",
        "UPDATE OF status",
        "OLD.status = 'PROCESSING' AND NEW.status <> 'PROCESSING'",
        "OLD",
        "-",
    ),
    _count_running("jobs_running_delete", "DELETE", "OLD.status = 'PROCESSING'", "OLD", "-"),
    # The jobs an upgraded file already holds.
    "INSERT INTO fair_active (key_id, slug, queued, tag) "
    "SELECT key_id, slug, COUNT(*), 0 FROM jobs WHERE status = 'QUEUED' GROUP BY key_id, slug",
    "INSERT INTO running_counts (key_id, running) "
    "SELECT key_id, COUNT(*) FROM jobs WHERE status = 'PROCESSING' GROUP BY key_id",
)
"""Weighted fair queuing between keys and per-key concurrency."""

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, _V1),
    (2, _V2),
    (3, _V3),
    (4, _V4),
    (5, _V5),
    (6, _V6),
    (7, _V7),
    (8, fair_order.MIGRATION),
)
"""(version reached, its statements), in order."""

SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring the database to ``SCHEMA_VERSION`` inside the caller's write transaction.

    Returns the version the file was at (0: new).

    Raises:
        QwenServeError: the file was written by a newer qwenserve.
    """
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    found: int = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
    if found > SCHEMA_VERSION:
        raise QwenServeError(
            f"the job store {path} has schema version {found}, newer than this qwenserve "
            f"understands ({SCHEMA_VERSION}): upgrade qwenserve"
        )
    if found == SCHEMA_VERSION:
        return found
    for version, statements in MIGRATIONS:
        if version > found:
            for statement in statements:
                db.execute(statement)
    db.execute("DELETE FROM schema_version")
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    return found
