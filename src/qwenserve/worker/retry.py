"""How a worker rides out a store outage: retry with backoff, then let the lease decide.

A Redis restart or a SQLite file locked by another process for a few seconds must not fail a
job whose image is already made: the store call is retried (the stores raise
``ServiceUnavailable`` for both) with exponential backoff for up to ``budget_s``. Every call
retried here is safe to repeat: job transitions check ownership (a repeat of one that was
applied is refused, never applied twice) and media puts write one id. Only when the outage
outlasts the budget does the error reach the caller, which then lets the job go: its lease runs
out and another worker (or this one) runs it again, within the bounded attempts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from qwenserve.errors import ServiceUnavailable

log = logging.getLogger("qwenserve.worker")

_T = TypeVar("_T")

STORE_OUTAGE_BUDGET_S = 60.0
"""How long a worker keeps retrying one store call: a Redis restart or a lock held by a backup
takes seconds; an outage longer than this is left to the leases."""


@dataclass(frozen=True)
class StoreRetry:
    """Retries a store call through ``ServiceUnavailable`` with exponential backoff.

    ``sleep`` and ``clock`` (monotonic seconds) are injectable, so tests do not wait.
    """

    budget_s: float = STORE_OUTAGE_BUDGET_S
    first_wait_s: float = 0.1
    max_wait_s: float = 2.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def call(self, what: str, attempt: Callable[[], _T]) -> _T:
        """``attempt()``, again after each ``ServiceUnavailable`` until ``budget_s`` is spent.

        Raises:
            ServiceUnavailable: the store was still unavailable when the budget ran out.
        """
        give_up_at = self.clock() + self.budget_s
        wait_s = self.first_wait_s
        while True:
            try:
                return attempt()
            except ServiceUnavailable as error:
                if self.clock() + wait_s > give_up_at:
                    log.error("%s: the store stayed unavailable; giving up", what)
                    raise
                log.warning("%s: %s; retrying in %.2f s", what, error.message, wait_s)
                self.sleep(wait_s)
                wait_s = min(2 * wait_s, self.max_wait_s)
