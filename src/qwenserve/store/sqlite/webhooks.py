"""The SQLite store's webhook deliveries (``webhook_deliveries``, schema v4), one transaction
per step, mixed into ``SqliteStore``."""

from __future__ import annotations

import json
from collections.abc import Sequence

from qwenserve.jobs import JobEvent
from qwenserve.store.sqlite.connection import SqliteDatabase
from qwenserve.store.webhooks import (
    DELIVERY_FIELDS,
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    delivery_from_record,
)

_COLUMNS = ", ".join(DELIVERY_FIELDS)
DELIVERY_RETENTION_S = 26 * 3600.0
"""A delivery record is kept this long after its job ended (past the 24 h of retries)."""


class SqliteWebhooks:
    """Webhook steps over ``self._db`` (the store's database)."""

    _db: SqliteDatabase

    def webhook_secret(self, key_id: str, *, candidate: str, rotate: bool = False) -> str | None:
        with self._db.write() as db:
            row = db.execute(
                "UPDATE api_keys SET webhook_secret = CASE WHEN ? OR webhook_secret IS NULL "
                "THEN ? ELSE webhook_secret END WHERE id = ? RETURNING webhook_secret",
                (int(rotate), candidate, key_id),
            ).fetchone()
        return str(row["webhook_secret"]) if row is not None else None

    def webhook_cursor(self) -> str | None:
        row = self._db.connection().execute("SELECT after FROM webhook_cursor").fetchone()
        return str(row["after"]) if row is not None and row["after"] is not None else None

    def enqueue_webhooks(self, events: Sequence[JobEvent], *, cursor: str, now: float) -> int:
        added = 0
        with self._db.write() as db:
            for event in events:
                if not event.type.is_terminal:
                    continue
                cursor_row = db.execute(
                    "INSERT OR IGNORE INTO webhook_deliveries (job_id, event_id, key_id, url, "
                    "status, created_at, next_attempt_at, expires_at) SELECT id, ?, key_id, "
                    "webhook_url, ?, ?, ?, ? FROM jobs WHERE id = ? AND webhook_url IS NOT NULL",
                    (
                        event.id,
                        DeliveryStatus.PENDING.value,
                        now,
                        now,
                        now + DELIVERY_RETENTION_S,
                        event.job_id,
                    ),
                )
                added += cursor_row.rowcount
            db.execute(
                "INSERT INTO webhook_cursor (id, after) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET after = excluded.after",
                (cursor,),
            )
        return added

    def claim_webhooks(
        self, owner: str, *, lease_s: float, now: float, limit: int = 10
    ) -> list[WebhookDelivery]:
        with self._db.write() as db:
            db.execute("DELETE FROM webhook_deliveries WHERE expires_at <= ?", (now,))
            rows = db.execute(
                f"UPDATE webhook_deliveries SET owner = ?, lease_until = ? WHERE job_id IN ("
                "SELECT job_id FROM webhook_deliveries WHERE status = 'pending' AND "
                "next_attempt_at <= ? AND (lease_until IS NULL OR lease_until <= ?) "
                f"ORDER BY next_attempt_at LIMIT ?) RETURNING {_COLUMNS}",
                (owner, now + lease_s, now, now, limit),
            ).fetchall()
        return [delivery_from_record(dict(row)) for row in rows]

    def release_webhook_leases(self, *, now: float) -> int:
        with self._db.write() as db:
            released = db.execute(
                "UPDATE webhook_deliveries SET owner = NULL, lease_until = NULL "
                "WHERE status = 'pending' AND lease_until > ?",
                (now,),
            ).rowcount
        return int(released)

    def record_webhook_attempt(
        self,
        job_id: str,
        owner: str,
        attempt: WebhookAttempt,
        *,
        status: DeliveryStatus,
        next_attempt_at: float | None,
        body: str,
        now: float,
    ) -> bool:
        with self._db.write() as db:
            row = db.execute(
                "SELECT attempts FROM webhook_deliveries WHERE job_id = ? AND owner = ? "
                "AND status = 'pending'",
                (job_id, owner),
            ).fetchone()
            if row is None:
                return False
            attempts = [*json.loads(row["attempts"]), attempt.to_dict()]
            db.execute(
                "UPDATE webhook_deliveries SET attempts = ?, status = ?, next_attempt_at = ?, "
                "owner = NULL, lease_until = NULL, body = COALESCE(body, ?) WHERE job_id = ?",
                (json.dumps(attempts), status.value, next_attempt_at, body, job_id),
            )
        return True

    def get_webhook(self, job_id: str) -> WebhookDelivery | None:
        row = (
            self._db.connection()
            .execute(f"SELECT {_COLUMNS} FROM webhook_deliveries WHERE job_id = ?", (job_id,))
            .fetchone()
        )
        return delivery_from_record(dict(row)) if row is not None else None
