"""How a worker claims, batches and holds jobs (``WorkerConfig``), in its own module so the
claimer, the runner and the composition root share it without importing the runner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qwenserve.config import WorkerSettings

_DEFAULTS = WorkerSettings()


@dataclass
class WorkerConfig:
    """How a runner claims, batches and holds jobs. The knobs a user sets take their defaults
    from ``WorkerSettings`` (``qwenserve.config``), where each is held once."""

    worker_id: str
    max_batch: int = field(kw_only=True)
    """Most requests run in one pipeline call (1 disables batching). No default: the setting's
    auto (None) depends on the engine's device, which the composition root resolves."""
    slugs: Sequence[str] | None = None
    lease_s: float = _DEFAULTS.lease_s
    max_attempts: int = _DEFAULTS.max_attempts
    poll_interval_s: float = _DEFAULTS.poll_interval_s
    heartbeat_s: float = 5.0
    """How often the worker announces itself in the registry (routing, `qwenserve status`)."""
    control_period_s: float | None = None
    """Seconds between job heartbeats (leases, progress, stops); None: ``min(1, lease_s / 3)``."""
    host: str = "localhost"
    batch_window_s: float = _DEFAULTS.batch_window_s
    """How long to wait for more same-shape requests before running a partial batch."""
    warm_streak_limit: int = 4
    """After this many warm claims in a row, look at cold models first once (no starvation)."""
    prefetch: bool = _DEFAULTS.prefetch
    """While a batch runs, claim the next job and load its inputs (a test that wants a runner
    to claim only inside ``run_once`` turns it off)."""
    media_retry_s: float = _DEFAULTS.media_retry_s
    """How long the finisher retries storing a finished image through a media store outage
    (the image kept), before it fails the job refunded."""

    @classmethod
    def from_settings(
        cls,
        worker: WorkerSettings,
        *,
        worker_id: str,
        max_batch: int,
        slugs: Sequence[str] | None = None,
        host: str = "localhost",
    ) -> WorkerConfig:
        """A served worker's config: ``Settings.worker`` and who this worker is."""
        return cls(
            worker_id=worker_id,
            max_batch=max_batch,
            slugs=slugs,
            host=host,
            lease_s=worker.lease_s,
            max_attempts=worker.max_attempts,
            poll_interval_s=worker.poll_interval_s,
            batch_window_s=worker.batch_window_s,
            prefetch=worker.prefetch,
            media_retry_s=worker.media_retry_s,
        )
