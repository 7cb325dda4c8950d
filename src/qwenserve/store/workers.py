"""Which workers are alive, what they serve, what they hold in memory and what they run.

Workers announce themselves every few seconds with a time-to-live; an announcement that is not
renewed lapses, so a killed worker disappears on its own. The API reads the registry for
/metrics and `qwenserve status`; workers read it to route: a job goes to a worker that already
holds its model when one is free (see ``qwenserve.worker.routing``).
``qwenserve.backends.open_backend`` picks the backend; the Redis one
(``qwenserve.store.redis.registry``) imports this module, never the other way round.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's announcement."""

    worker_id: str
    host: str
    slugs: tuple[str, ...]
    """Models it serves (empty: all)."""
    resident: tuple[str, ...]
    """Base weights it has loaded (residency keys, e.g. 'Qwen/Qwen-Image')."""
    current_job: str | None
    started_at: float
    last_seen: float
    compiles: dict[str, int] = field(default_factory=dict)
    """The engine's torch.compile counts ("compiles", "recompiles", "eager_fallbacks"); empty
    without ``compile`` or for an engine that does not count."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The worker's figures for /metrics (counters, gauges, histograms): a JSON snapshot whose
    format ``qwenserve.worker.metrics`` defines; empty from a worker that reports none."""

    @property
    def busy(self) -> bool:
        return self.current_job is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerInfo:
        data: dict[str, Any] = json.loads(text)
        data["slugs"] = tuple(data["slugs"])
        data["resident"] = tuple(data["resident"])
        data["compiles"] = {str(k): int(v) for k, v in data.get("compiles", {}).items()}
        metrics = data.get("metrics")
        data["metrics"] = metrics if isinstance(metrics, dict) else {}
        return cls(**data)


class WorkerRegistry(Protocol):
    def announce(self, info: WorkerInfo, *, ttl_s: float) -> None:
        """Record or refresh ``info``; it lapses ``ttl_s`` after ``info.last_seen``."""

    def alive(self, *, now: float) -> list[WorkerInfo]:
        """Workers whose announcement has not lapsed, by id."""

    def remove(self, worker_id: str) -> None:
        """Forget a worker that stopped cleanly."""


class SqliteWorkerRegistry:
    """The registry in the embedded store's database file (its own table)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._conn().execute(
            "CREATE TABLE IF NOT EXISTS workers ("
            "worker_id TEXT PRIMARY KEY, info TEXT NOT NULL, lapses_at REAL NOT NULL)"
        )

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=10.0, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=10000")
            # Presence is rewritten every few seconds: no disk sync per announcement.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def announce(self, info: WorkerInfo, *, ttl_s: float) -> None:
        self._conn().execute(
            "INSERT INTO workers (worker_id, info, lapses_at) VALUES (?, ?, ?) "
            "ON CONFLICT(worker_id) DO UPDATE SET info = excluded.info, "
            "lapses_at = excluded.lapses_at",
            (info.worker_id, info.to_json(), info.last_seen + ttl_s),
        )

    def alive(self, *, now: float) -> list[WorkerInfo]:
        rows = self._conn().execute(
            "SELECT info FROM workers WHERE lapses_at > ? ORDER BY worker_id", (now,)
        )
        return [WorkerInfo.from_json(row[0]) for row in rows.fetchall()]

    def remove(self, worker_id: str) -> None:
        self._conn().execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))
