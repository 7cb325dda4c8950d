"""Accepted means replicated: a submit is answered only once Redis confirms it on N replicas.

Redis replicates asynchronously, so a primary that dies (SIGKILL, a lost host) takes with it the
writes its replicas had not received yet; Sentinel then promotes a replica that never saw them.
With ``QWENSERVE_REDIS_MIN_REPLICAS=N`` the submit script and a ``WAIT N timeout`` go in one
pipeline, on one connection (WAIT counts the replicas that acknowledged *that connection's*
writes). If fewer than N confirm within ``QWENSERVE_REDIS_REPLICA_WAIT_S``, the job is withdrawn
before anyone is told about it: failed as ``NotReplicated`` with its charge refunded (the same
refunding failure every ending uses, so a worker that claimed it meanwhile cannot complete it)
and its idempotency record dropped, so sending the request again is a fresh submit. The caller
gets a 503 with ``Retry-After`` and is charged nothing. A fast job may be claimed, run and
completed within the wait: that one cannot be withdrawn. With an ``Idempotency-Key`` it stays
charged and the retry is answered with it (charged once); without one it is refunded.

What remains (documented in docs/DEPLOY.md): the withdrawal is itself a write; if the primary
dies in the instant after an unconfirmed submit *and* a replica had received the submit but not
the withdrawal, the promoted replica holds the job, queued and charged, under a request id its
caller never saw (a retry with the same ``Idempotency-Key`` is answered with that job). A
replayed submit (same ``Idempotency-Key``) waits for this connection's writes only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NoReturn

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from qwenserve.errors import NotReplicated
from qwenserve.store.redis.client import STORE_RETRY_AFTER_S, unavailable_as_503

log = logging.getLogger("qwenserve.store")

DEFAULT_REPLICA_WAIT_S = 1.0
"""How long a submit waits for its replicas by default (``QWENSERVE_REDIS_REPLICA_WAIT_S``)."""
NOT_REPLICATED_KIND = "NotReplicated"
"""The failure kind of a withdrawn submit (``errors.NotReplicated``'s name)."""
NOT_REPLICATED_MESSAGE = "withdrawn: the submit was not confirmed on enough Redis replicas"


class ReplicaWait:
    """Runs a script and a ``WAIT`` on one connection and says whether enough replicas confirmed.

    Args:
        client: the store's client.
        min_replicas: replicas that must confirm (0: no WAIT, every write answered at once).
        wait_s: how long the WAIT may block before the write counts as unconfirmed.
        what: the store, as a 503 names it.
    """

    def __init__(
        self, client: redis.Redis, *, min_replicas: int, wait_s: float, what: str = "the job store"
    ) -> None:
        if min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {min_replicas}")
        if wait_s <= 0:
            raise ValueError(f"wait_s must be positive, got {wait_s}")
        self._redis = client
        self.min_replicas = min_replicas
        self.wait_ms = max(1, round(wait_s * 1000))
        self.what = what
        """What a 503 says is unavailable."""

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, bool]:
        """The script's reply, and whether ``min_replicas`` replicas confirmed its writes.

        Raises:
            StoreUnavailable: Redis unreachable or failing over.
        """
        with unavailable_as_503(self.what):
            if not self.min_replicas:
                return script(keys=list(keys), args=list(args)), True
            for attempt in (1, 2):
                pipe = self._redis.pipeline(transaction=False)
                script(keys=list(keys), args=list(args), client=pipe)
                pipe.wait(self.min_replicas, self.wait_ms)
                try:
                    reply, acked = pipe.execute()
                except NoScriptError:
                    # The pipeline loaded its scripts, then the primary changed (a failover in
                    # between): load them on the new one and run once more.
                    if attempt == 2:
                        raise
                    continue
                return reply, int(acked) >= self.min_replicas
        raise AssertionError("unreachable")  # pragma: no cover

    def withdraw(
        self,
        script: Script,
        *,
        prefix: str,
        job_key: str,
        job_id: str,
        idempotency_record: str | None,
        now_text: str,
    ) -> NoReturn:
        """Withdraw a submit its replicas did not confirm (``lua/withdraw.lua``, one step): a
        job still waiting or running fails refunded (a worker that claimed it meanwhile cannot
        complete it) and its idempotency record is dropped. A job that already ran to its end
        in the wait (a fast one) cannot be withdrawn: with an idempotency record it keeps its
        charge and the record, so the retry the 503 asks for is answered with it (charged
        once); without one nobody can find it again, so it is refunded. A replayed or refused
        submit has nothing of its own to withdraw.

        Raises:
            NotReplicated: always (StoreUnavailable if Redis fails meanwhile).
        """
        with unavailable_as_503("the job store"):
            outcome = script(
                keys=[job_key, idempotency_record or ""],
                args=[prefix, job_id, NOT_REPLICATED_KIND, NOT_REPLICATED_MESSAGE, now_text],
            )[0]
        if outcome in ("kept", "refunded"):
            log.info("job %s ended within its replica wait: %s", job_id, outcome)
        settled = (
            "it already ran: send it again with the same Idempotency-Key to get it, charged once"
            if outcome == "kept"
            else "nothing was charged, retry later"
        )
        raise NotReplicated(
            f"the job store could not confirm the request on its replicas; {settled}",
            field="store",
            retry_after_s=STORE_RETRY_AFTER_S,
        )
