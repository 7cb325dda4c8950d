"""The per-key series of /metrics: each key's jobs queued and running now, and the GPU seconds
served to it, so an operator sees who holds the queue and who got the GPUs (weighted fair
queuing, ``store/fair.py``).

Labelled ``key`` (the key's name) and ``key_id`` (names are labels for people and need not be
unique; the id is not the secret, which is never stored). Kept apart from ``api/metrics.py``:

- **queued / running**: gauges read at scrape time from the per-key counts the store keeps for
  the queue limits (``Store.key_loads``: no scan of the jobs); a key with neither is absent.
- **GPU seconds**: a counter of the measured ``inference_time_s`` of each completed job (the
  figure ``qwenserve keys usage`` sums), added per key as the process's one reader of the event
  log (``notify/follower.py``) hands out the completion, counted from this node's start.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qwenserve.api.services import Services
from qwenserve.jobs import JobEvent, JobEventType
from qwenserve.notify.follower import EventFollower
from qwenserve.store.base import Store

LABELS = ["key", "key_id"]


class KeyLoads(Collector):
    """Jobs queued and running per key, read from the store at each scrape."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        loads = self.services.store.key_loads()
        queued = GaugeMetricFamily(
            "qwenserve_key_jobs_queued", "QUEUED jobs of each key, now", labels=LABELS
        )
        running = GaugeMetricFamily(
            "qwenserve_key_jobs_running",
            "PROCESSING jobs of each key, now (what its --max-running caps)",
            labels=LABELS,
        )
        for load in loads:
            queued.add_metric([load.name, load.key_id], float(load.queued))
            running.add_metric([load.name, load.key_id], float(load.running))
        yield queued
        yield running


class KeyGpuSeconds(Collector):
    """GPU seconds served per key: each completion's measured inference time, from the events
    ``reader`` hands out since this node started."""

    def __init__(self, reader: EventFollower, store: Store) -> None:
        self.reader = reader
        self.store = store
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._names: dict[str, str] = {}
        reader.subscribe(self.on_event)

    def on_event(self, event: JobEvent) -> None:
        """The reader's subscriber: a completion adds its job's inference time to its key."""
        if event.type is not JobEventType.COMPLETED:
            return
        job = self.store.get_job(event.job_id, now=event.at)
        if job is None or job.result is None:  # purged since: its time is not known here
            return
        with self._lock:
            served = self._seconds.get(event.key_id, 0.0)
            self._seconds[event.key_id] = served + max(0.0, job.result.inference_time_s)

    def collect(self) -> Iterator[Metric]:
        self.reader.catch_up()  # counted up to the scrape
        with self._lock:
            served = dict(self._seconds)
        family = CounterMetricFamily(
            "qwenserve_key_gpu_seconds",
            "GPU seconds served to each key: the inference time of its completed jobs",
            labels=LABELS,
        )
        for key_id, seconds in sorted(served.items()):
            family.add_metric([self._name(key_id), key_id], seconds)
        yield family

    def _name(self, key_id: str) -> str:
        name = self._names.get(key_id)
        if name is None:
            key = self.store.get_key(key_id)
            name = key.name if key is not None else ""
            self._names[key_id] = name
        return name
