"""Which jobs a worker takes: the routing plan's order, batch-mates, and what goes back.

Time is injected (``clock`` for deadlines, ``sleep`` for the batch window's waits), so the
batching window is tested without sleeping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

from qwenserve.catalog import MODELS
from qwenserve.jobs import Job
from qwenserve.store.workers import WorkerRegistry
from qwenserve.worker.control import Clock, JobControl
from qwenserve.worker.routing import idle_peer_serves, plan_claims

if TYPE_CHECKING:
    from qwenserve.store.base import Store
    from qwenserve.worker.config import WorkerConfig
    from qwenserve.worker.engine import ImageEngine
    from qwenserve.worker.finisher import Finisher

log = logging.getLogger("qwenserve.worker")

Sleep = Callable[[float], None]

BATCH_POLL_S = 0.005
"""How often the batch window looks for more batch-mates."""


class Claimer:
    """Claims jobs for one worker: one by the routing plan, then its batch-mates.

    Every claimed job is handed to ``control`` (heartbeated from that moment); a claimed job
    that cannot join the batch goes straight back through ``finisher.give_back``.
    """

    def __init__(
        self,
        *,
        store: Store,
        engine: ImageEngine,
        config: WorkerConfig,
        control: JobControl,
        finisher: Finisher,
        registry: WorkerRegistry | None,
        clock: Clock,
        sleep: Sleep,
    ) -> None:
        self.store = store
        self.engine = engine
        self.config = config
        self.control = control
        self.finisher = finisher
        self.registry = registry
        self.clock = clock
        self.sleep = sleep
        self._warm_streak = 0

    def claim(self, slugs: Sequence[str], limit: int) -> list[Job]:
        """Claim up to ``limit`` jobs of ``slugs``; heartbeated from this moment on. Jobs the
        claim ended on the way go to the finisher's endings handler at once."""
        jobs = self.store.claim(
            self.config.worker_id,
            slugs=slugs,
            lease_s=self.config.lease_s,
            max_attempts=self.config.max_attempts,
            now=self.clock(),
            limit=limit,
        )
        self.control.hold(jobs)
        self.finisher.claim_ended(jobs.events)
        return jobs

    def claim_work(self, *, look_ahead: bool) -> list[Job]:
        """One job by the routing plan, with its batch-mates; [] when nothing is claimable.

        Models already resident here come first, then models no idle peer holds; every
        ``warm_streak_limit`` warm claims the order flips once so cold models never starve.
        Looking ahead (while a batch runs), leave to idle peers what they would start at once.
        """
        peers = self.registry.alive(now=self.clock()) if self.registry is not None else []
        me = self.config.worker_id
        plan = plan_claims(
            served=list(self.config.slugs or MODELS),
            resident=self.engine.resident(),
            peers=peers,
            worker_id=me,
        )
        order = [(plan.warm, True), (plan.cold, False)]
        if self._warm_streak >= self.config.warm_streak_limit:
            order.reverse()
        for slugs, warm in order:
            if look_ahead:
                slugs = tuple(s for s in slugs if not idle_peer_serves(s, peers, me))
            if not slugs:
                continue
            jobs = self.claim(slugs, 1)
            if jobs:
                self._warm_streak = self._warm_streak + 1 if warm else 0
                return self.with_batch_mates(jobs, self.config.batch_window_s)
        return []

    def with_batch_mates(self, batch: list[Job], window_s: float) -> list[Job]:
        """``batch`` plus queued jobs that can share its pipeline call, waiting up to
        ``window_s`` (on the injected clock) for them; claimed jobs that cannot join go back."""
        if self.config.max_batch <= 1 or len(batch) >= self.config.max_batch:
            return batch
        first = batch[0]
        key = self.batch_key(first)
        if key is None:
            return batch
        batch = list(batch)
        deadline = self.clock() + window_s
        while len(batch) < self.config.max_batch:
            try:
                more = self.claim([first.slug], self.config.max_batch - len(batch))
            except Exception:
                # The store hiccupped: run the jobs in hand. Raising would drop them while
                # they stay held, heartbeated forever and never run (issue 13, defect 3).
                log.warning("worker %s: topping up a batch failed", self.config.worker_id)
                break
            mates = []
            for job in more:
                if self.batch_key(job) == key:
                    mates.append(job)
                else:  # not a batch-mate: straight back, its attempt given back
                    self.finisher.give_back(job, "not a batch-mate")
            batch.extend(mates)
            remaining_s = deadline - self.clock()
            if more and not mates:
                break  # what waits next in line cannot join: do not churn it
            if len(batch) >= self.config.max_batch or remaining_s <= 0:
                break
            if not more:
                self.sleep(min(BATCH_POLL_S, remaining_s))
        return batch

    def batch_key(self, job: Job) -> Hashable | None:
        """The key batch-mates share (from the job's typed request, its fixed size included);
        None for a job that must run alone: one whose key the engine cannot make, or a retry
        (its last run never ended: it may be what crashed that worker, and alone it cannot take
        batch-mates down with it again)."""
        if job.attempts > 1:
            return None
        try:
            return self.engine.batch_key(job.request)
        except Exception:
            return None
