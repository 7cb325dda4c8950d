"""The /metrics series beyond the queue gauges (``api/ops.py``): HTTP, workers, job outcomes.

- **HTTP**: ``api/http_metrics.py``'s ASGI middleware counts requests and times them by route
  template (``/v2/requests/{request_id}/status``, never a raw id), method and status. It only
  touches in-memory prometheus objects: no store call per request.
- **Workers**: each worker's own figures (queue wait, inference, seconds per step, batch sizes,
  pipeline loads and evictions, LoRA cache, memory) arrive in its registry announcement
  (``worker/metrics.py``) and are rendered here per worker at scrape time, so one API node's
  /metrics is complete whichever process the workers run in. No torch here.
- **Job outcomes**: completions and failures by kind, counted from the store's event log,
  which records every ending wherever it happened (a worker, a give-up inside someone's claim,
  a cancel, an expiry): a subscriber of the process's one reader (``notify/follower.py``),
  counted from this node's start; a scrape asks the reader to catch up first. Content policy
  blocks are counted the same way, by what was blocked (from the block's fixed message), so
  the blocks of workers in other processes are counted with no channel of their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from qwenserve.api.http_metrics import HttpMetricsMiddleware
from qwenserve.api.services import Services
from qwenserve.errors import ContentPolicyViolation
from qwenserve.jobs import JobEvent, JobEventType
from qwenserve.notify.follower import EventFollower
from qwenserve.policy import blocked_stage
from qwenserve.worker.metrics import SPECS, MetricSpec

log = logging.getLogger("qwenserve.api")


def instrument(app: FastAPI, registry: CollectorRegistry) -> None:
    """Count and time every HTTP request into ``registry`` (see the module docstring)."""
    app.add_middleware(HttpMetricsMiddleware, registry=registry)


class WorkerFiguresCollector(Collector):
    """Renders every live worker's announced figures, labelled by worker."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        workers = self.services.workers()
        for spec in SPECS.values():
            family = _family(spec)
            for worker in workers:
                for entry in worker.metrics.get(spec.name, ()):
                    try:
                        _add(family, spec, worker.worker_id, entry)
                    except (TypeError, ValueError, IndexError):  # another release's format
                        log.debug("skipping %s from %s: %r", spec.name, worker.worker_id, entry)
            yield family


def _family(spec: MetricSpec) -> Metric:
    labels = ["worker", *spec.labels]
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=labels)
    return HistogramMetricFamily(spec.name, spec.help, labels=labels)


def _add(family: Metric, spec: MetricSpec, worker: str, entry: Sequence[Any]) -> None:
    labels = [worker, *(str(v) for v in entry[0])]
    if len(labels) != len(spec.labels) + 1:
        raise ValueError("label count")
    if isinstance(family, HistogramMetricFamily):
        bounds, counts, total = entry[1], entry[2], float(entry[3])
        if len(counts) != len(bounds) + 1:
            raise ValueError("bucket count")
        cumulative, buckets = 0, []
        for bound, count in zip([*map(float, bounds), float("inf")], counts, strict=True):
            cumulative += int(count)
            buckets.append((_le(bound), float(cumulative)))
        family.add_metric(labels, buckets, total)
    elif isinstance(family, CounterMetricFamily | GaugeMetricFamily):
        family.add_metric(labels, float(entry[1]))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class JobOutcomes(Collector):
    """Jobs completed, and failed by kind, per model: counted from the events ``reader`` (the
    process's one reader of the log) hands out since this node started (every ending is
    logged, whoever made it)."""

    def __init__(self, reader: EventFollower) -> None:
        self.reader = reader
        self._lock = threading.Lock()
        self._completed: dict[str, int] = {}
        self._failed: dict[tuple[str, str], int] = {}
        self._blocked: dict[str, int] = dict.fromkeys(("prompt", "input", "output"), 0)
        reader.subscribe(self.on_event)

    def on_event(self, event: JobEvent) -> None:
        """The reader's subscriber: count each ending."""
        with self._lock:
            if event.type is JobEventType.COMPLETED:
                self._completed[event.slug] = self._completed.get(event.slug, 0) + 1
            elif event.type is JobEventType.FAILED:
                key = (event.slug, event.error_kind or "unknown")
                self._failed[key] = self._failed.get(key, 0) + 1
                stage = blocked_stage(event.error)
                if event.error_kind == ContentPolicyViolation.kind and stage is not None:
                    self._blocked[stage] = self._blocked.get(stage, 0) + 1

    def collect(self) -> Iterator[Metric]:
        self.reader.catch_up()  # counted up to the scrape
        with self._lock:
            completed = dict(self._completed)
            failed = dict(self._failed)
            blocked = dict(self._blocked)
        done = CounterMetricFamily(
            "qwenserve_jobs_completed", "Jobs completed (from the event log)", labels=["model"]
        )
        for slug, count in sorted(completed.items()):
            done.add_metric([slug], float(count))
        yield done
        failures = CounterMetricFamily(
            "qwenserve_job_failures",
            "Jobs failed, by kind: an error class (InvalidInput, UpstreamError, InferenceError, "
            "...), cancelled or expired (from the event log)",
            labels=["model", "kind"],
        )
        for (slug, kind), count in sorted(failed.items()):
            failures.add_metric([slug, kind], float(count))
        yield failures
        blocks = CounterMetricFamily(
            "qwenserve_content_policy_blocks",
            "Requests the content policy blocked, by what it checked: prompt (blocked terms, at "
            "submit), input or output (the image classifier, in a worker); from the event log",
            labels=["kind"],
        )
        for stage, count in sorted(blocked.items()):
            blocks.add_metric([stage], float(count))
        yield blocks
