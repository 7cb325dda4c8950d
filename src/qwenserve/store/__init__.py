"""Stores: where jobs, keys, credits, rate limits and the job event log live (SQLite embedded,
Redis scaled out), and the worker registry beside them.

Which one a process uses is decided in ``qwenserve.backends.open_backend``, nowhere here.
"""

from __future__ import annotations

from qwenserve.store.base import ApiKey, Heartbeat, QueueStats, Store, SubmitOutcome

__all__ = [
    "ApiKey",
    "Heartbeat",
    "QueueStats",
    "Store",
    "SubmitOutcome",
]
