"""One SQLite file shared by threads and processes: a connection per thread, atomic steps.

Every writing step is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write lock up
front, so two writers (API threads, worker threads, or the ``qwenserve keys`` CLI in another
process) queue on ``busy_timeout`` instead of failing half-way or deadlocking on a lock upgrade.
Readers never block in WAL mode. Each thread gets its own connection (sqlite3 connections are
not meant to be shared between threads mid-transaction).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwenserve.errors import QwenServeError, ServiceUnavailable

DEFAULT_BUSY_TIMEOUT_S = 10.0

log = logging.getLogger("qwenserve.store")


class SqliteDatabase:
    """Connections to one database file, one per thread, all closed by ``close()``."""

    def __init__(self, path: Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        if self._closed:
            raise QwenServeError(f"the job store {self.path} is closed")
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        connection = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,  # only so close() may close it from another thread
        )
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout_s * 1000)}")
        connection.execute("PRAGMA journal_mode = WAL")
        # NORMAL is crash-safe in WAL mode; only a power cut may lose the last commits.
        connection.execute("PRAGMA synchronous = NORMAL")
        with self._connections_lock:
            self._connections.append(connection)
        self._local.connection = connection
        return connection

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One atomic writing step: the write lock is taken first, released on commit/rollback.

        Raises:
            ServiceUnavailable: another writer held the lock for longer than busy_timeout_s.
        """
        connection = self.connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            # Another writer held the lock for longer than busy_timeout_s: a 503, not a crash.
            log.warning("the job store is busy: %s", error)
            raise ServiceUnavailable(
                "the job store is busy; retry shortly", field="store", retry_after_s=1.0
            ) from None
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot across several SELECTs."""
        connection = self.connection()
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")

    def close(self) -> None:
        """Close every connection opened here (in any thread); later use raises."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()
