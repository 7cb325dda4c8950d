"""The SQLite store's API keys and credits (``api_keys``), one transaction per step, mixed into
``SqliteStore``. Money is integer micro-USD (``store.rules``)."""

from __future__ import annotations

import json
import sqlite3

from qwenserve.store import rules
from qwenserve.store.base import ApiKey, KeyLoad
from qwenserve.store.records import KEY_FIELDS, key_from_record
from qwenserve.store.sqlite.connection import SqliteDatabase

_KEY_COLUMNS = ", ".join(KEY_FIELDS)
_KEY_MARKS = ", ".join("?" * len(KEY_FIELDS))


class SqliteKeys:
    """Key and credit steps over ``self._db`` (the store's database)."""

    _db: SqliteDatabase

    def create_key(self, key: ApiKey) -> None:
        try:
            with self._db.write() as db:
                db.execute(
                    f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES ({_KEY_MARKS})",
                    (
                        key.id,
                        key.key_hash,
                        key.name,
                        rules.to_micro(key.balance_usd),
                        key.rpm,
                        json.dumps(list(key.models)),
                        key.created_at,
                        int(key.revoked),
                        key.max_queued,
                        key.weight,
                        key.max_running,
                    ),
                )
        except sqlite3.IntegrityError:
            raise rules.duplicate_key(key.id) from None

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        row = (
            self._db.connection()
            .execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,))
            .fetchone()
        )
        return key_from_record(dict(row)) if row is not None else None

    def get_key(self, key_id: str) -> ApiKey | None:
        row = (
            self._db.connection()
            .execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
            .fetchone()
        )
        return key_from_record(dict(row)) if row is not None else None

    def list_keys(self) -> list[ApiKey]:
        rows = (
            self._db.connection()
            .execute(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")
            .fetchall()
        )
        return [key_from_record(dict(row)) for row in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._db.write() as db:
            cursor = db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,))
            return cursor.rowcount == 1

    def topup(self, key_id: str, amount_usd: float) -> float:
        with self._db.write() as db:
            row = db.execute(
                "UPDATE api_keys SET balance_micro = balance_micro + ? WHERE id = ? "
                "RETURNING balance_micro",
                (rules.to_micro(amount_usd), key_id),
            ).fetchone()
            if row is None:
                raise KeyError(key_id)
            return rules.to_usd(row["balance_micro"])

    def key_loads(self) -> list[KeyLoad]:
        # The counts the schema's triggers keep (queued_counts, running_counts; '' is the
        # cluster's total, not a key).
        rows = (
            self._db.connection()
            .execute(
                "SELECT k.id, k.name, COALESCE(q.queued, 0) AS queued, "
                "COALESCE(r.running, 0) AS running FROM api_keys k "
                "LEFT JOIN queued_counts q ON q.key_id = k.id "
                "LEFT JOIN running_counts r ON r.key_id = k.id "
                "WHERE COALESCE(q.queued, 0) > 0 OR COALESCE(r.running, 0) > 0 ORDER BY k.id"
            )
            .fetchall()
        )
        return [KeyLoad(row["id"], row["name"], row["queued"], row["running"]) for row in rows]

    def update_key(
        self,
        key_id: str,
        *,
        rpm: int | None = None,
        max_queued: int | None = None,
        weight: float | None = None,
        max_running: int | None = None,
        balance_usd: float | None = None,
    ) -> ApiKey | None:
        balance_micro = rules.to_micro(balance_usd) if balance_usd is not None else None
        with self._db.write() as db:
            row = db.execute(
                "UPDATE api_keys SET rpm = COALESCE(?, rpm), max_queued = COALESCE(?, max_queued), "
                "weight = COALESCE(?, weight), max_running = COALESCE(?, max_running), "
                "balance_micro = COALESCE(?, balance_micro) "
                f"WHERE id = ? RETURNING {_KEY_COLUMNS}",
                (rpm, max_queued, weight, max_running, balance_micro, key_id),
            ).fetchone()
        return key_from_record(dict(row)) if row is not None else None
