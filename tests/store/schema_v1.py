"""A data dir as the previous release (schema version 1) left it, for the migration tests.

``V1_SCHEMA`` is that release's DDL, verbatim (``store/sqlite.py`` at the commit before the job
control redesign); ``make_v1_database`` fills a file with it the way that release wrote rows: a
key that used its rate window and jobs in every state, with the ``extra`` column it had.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

V1_SCHEMA: tuple[str, ...] = (
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

V1_RESULT = {
    "media_id": "media-v1",
    "content_type": "image/png",
    "width": 1024,
    "height": 768,
    "seed": 11,
    "inference_time_s": 2.5,
    "size_bytes": 4321,
}


@dataclass(frozen=True)
class V1Data:
    """What ``make_v1_database`` wrote: the ids to look for after the upgrade."""

    key_id: str
    key_hash: str
    balance_micro: int
    queued: str
    queued_other_model: str
    processing: str
    completed: str
    failed: str


def v1_params(slug: str, prompt: str, seed: int) -> dict[str, object]:
    """A job's ``params`` as the v1 release wrote them: ``GenerationRequest.to_dict()`` of its
    day, with no ``size`` (sizes were planned by the worker then) and no preview fields."""
    return {
        "slug": slug,
        "prompt": prompt,
        "steps": 30,
        "guidance": 4.0,
        "seed": seed,
        "image_format": "png",
        "quality": 90,
        "base64": False,
        "negative_prompt": None,
        "aspect_ratio": "3:4",
        "width": None,
        "height": None,
        "images": [],
        "lora": None,
        "extra_loras": [],
    }


def make_v1_database(path: Path, *, now: float) -> V1Data:
    """A v1 database at ``path`` with one key (balance $9.00 after four paid jobs) and jobs
    QUEUED (two models), PROCESSING (lease until now + 30), COMPLETED and FAILED."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = V1Data(
        key_id="key-v1",
        key_hash="ab" * 32,
        balance_micro=9_000_000,
        queued="job-v1-queued",
        queued_other_model="job-v1-queued-fast",
        processing="job-v1-processing",
        completed="job-v1-completed",
        failed="job-v1-failed",
    )
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        for statement in V1_SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        db.execute(
            "INSERT INTO api_keys (id, key_hash, name, balance_micro, rpm, models, created_at, "
            "revoked, window_start, window_count) VALUES (?, ?, 'v1 key', ?, 10, ?, ?, 0, ?, 4)",
            (data.key_id, data.key_hash, data.balance_micro, json.dumps(["qwen-image"]), now, now),
        )
        columns = (
            "id, slug, key_id, params, status, created_at, expires_at, cost_micro, attempts, "
            "started_at, finished_at, result, error, error_kind, worker_id, lease_until, extra"
        )
        done, failure = json.dumps(V1_RESULT), "InferenceError"
        # id, slug, status, attempts, started_at, finished_at, result, error, error_kind,
        # worker_id, lease_until
        rows = [
            (data.queued, "qwen-image", "QUEUED", 0, None, None, None, None, None, None, None),
            (data.queued_other_model, "qwen-image-fast", "QUEUED", 0, *[None] * 7),
            (data.processing, "qwen-image", "PROCESSING", 1, now, *[None] * 4, "w-old", now + 30),
            (data.completed, "qwen-image", "COMPLETED", 1, now, now + 2, done, *[None] * 4),
            (
                data.failed,
                "qwen-image",
                "FAILED",
                1,
                now,
                now + 1,
                None,
                "boom",
                failure,
                None,
                None,
            ),
        ]
        for offset, (job_id, slug, status, attempts, *rest) in enumerate(rows):
            db.execute(
                f"INSERT INTO jobs ({columns}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, 250000, ?, ?, ?, ?, ?, ?, ?, ?, '{\"v\": 1}')",
                (
                    job_id,
                    slug,
                    data.key_id,
                    json.dumps(v1_params(str(slug), f"job {offset}", offset)),
                    status,
                    now - 10 + offset,
                    now + 3600,
                    attempts,
                    *rest,
                ),
            )
        db.execute("COMMIT")
    finally:
        db.close()
    return data
