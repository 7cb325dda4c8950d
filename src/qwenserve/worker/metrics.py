"""What a worker measures for /metrics, and how it travels: inside its registry announcement.

Workers may be other processes (scale-out over Redis), yet one /metrics per API node should be
complete. So a worker keeps its figures in memory (``WorkerMetrics``: cumulative counters,
gauges and fixed-bucket histograms, no I/O, no prometheus objects) and puts a JSON snapshot of
them in every announcement (``WorkerInfo.metrics``); the API's collector (``api/metrics.py``)
renders each worker's snapshot with a ``worker`` label. Labelling by worker keeps every
counter monotonic: a worker that restarts starts new series at zero instead of making a sum
go down. Figures are as old as the last announcement (a few seconds at most; one is sent when
a batch starts and when it ends).

``SPECS`` is the one table of these series (name, type, help, labels, buckets), read by both
sides. Snapshot format, per metric name::

    counters/gauges: [[label values...], value]
    histograms:      [[label values...], [upper bounds...], [count per bucket..., +Inf], sum]
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from qwenserve.worker.engine import CountsPipelines, ReportsDeviceMemory
from qwenserve.worker.inputs import CountsLoraCache

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One series family a worker reports. Counter names carry no ``_total`` (added on render)."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


QUEUE_WAIT = MetricSpec(
    "qwenserve_job_queue_wait_seconds",
    "histogram",
    "Seconds from submit to the claim that ran the job",
    ("model",),
    (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
INFERENCE = MetricSpec(
    "qwenserve_job_inference_seconds",
    "histogram",
    "Seconds of the pipeline call that made a job's image (a batch's jobs share its time)",
    ("model",),
    (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
STEP = MetricSpec(
    "qwenserve_denoising_step_seconds",
    "histogram",
    "Seconds per denoising step of a pipeline call (time between step reports)",
    ("model",),
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH = MetricSpec(
    "qwenserve_batch_size",
    "histogram",
    "Requests per pipeline call (batch occupancy)",
    ("model",),
    (1, 2, 3, 4, 6, 8, 16),
)
LOADS = MetricSpec(
    "qwenserve_pipeline_loads",
    "counter",
    "Base pipelines loaded into memory, by residency key",
    ("model",),
)
EVICTIONS = MetricSpec(
    "qwenserve_pipeline_evictions",
    "counter",
    "Resident pipelines evicted (least recently used) to make room, by residency key",
    ("model",),
)
LORA_HITS = MetricSpec(
    "qwenserve_lora_cache_hits", "counter", "Client LoRA files (lora_N_url) found in the cache"
)
LORA_MISSES = MetricSpec(
    "qwenserve_lora_cache_misses", "counter", "Client LoRA files downloaded (not in the cache)"
)
MEMORY = MetricSpec(
    "qwenserve_worker_memory_bytes",
    "gauge",
    "A worker's memory: kind=rss (its process), gpu_allocated and gpu_reserved (CUDA only)",
    ("kind",),
)

SPECS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        QUEUE_WAIT,
        INFERENCE,
        STEP,
        BATCH,
        LOADS,
        EVICTIONS,
        LORA_HITS,
        LORA_MISSES,
        MEMORY,
    )
}
"""Every series a worker announces; the API renders these names and no others."""


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int]
    sum: float = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is inclusive).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class WorkerMetrics:
    """A worker's cumulative figures; thread-safe (engine, finisher and presence threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[str, ...], float]] = {}
        self._histograms: dict[str, dict[tuple[str, ...], _Histogram]] = {}

    def observe(self, spec: MetricSpec, value: float, *labels: str) -> None:
        """Add ``value`` to histogram ``spec`` under ``labels`` (in ``spec.labels`` order)."""
        with self._lock:
            series = self._histograms.setdefault(spec.name, {})
            histogram = series.get(labels)
            if histogram is None:
                histogram = _Histogram(spec.buckets, [0] * (len(spec.buckets) + 1))
                series[labels] = histogram
            histogram.observe(value)

    def count(self, spec: MetricSpec, amount: float = 1.0, *labels: str) -> None:
        """Add ``amount`` to counter ``spec`` under ``labels``."""
        with self._lock:
            series = self._counters.setdefault(spec.name, {})
            series[labels] = series.get(labels, 0.0) + amount

    def snapshot(
        self,
        *,
        counters: Mapping[str, Mapping[tuple[str, ...], float]] | None = None,
        gauges: Mapping[str, Mapping[tuple[str, ...], float]] | None = None,
    ) -> dict[str, Any]:
        """The JSON-able figures for an announcement, with counters kept elsewhere (the
        engine's loads and evictions, the LoRA cache's) and gauges read now merged in."""
        with self._lock:
            out: dict[str, Any] = {
                name: [[list(labels), value] for labels, value in sorted(series.items())]
                for name, series in self._counters.items()
            }
            for name, hists in self._histograms.items():
                out[name] = [
                    [list(labels), list(h.bounds), list(h.counts), h.sum]
                    for labels, h in sorted(hists.items())
                ]
        for extra in (counters or {}, gauges or {}):
            for name, series in extra.items():
                out[name] = [[list(labels), value] for labels, value in sorted(series.items())]
        return out


def process_rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc``); None where it cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class StepTimer:
    """Observes seconds per denoising step of one pipeline call from its step reports.

    The first step of a call of several is not timed: it also holds the call's setup (text
    encoding, latents); a call of one step is timed from its start, or it would go unseen.
    """

    def __init__(self, metrics: WorkerMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self._started = time.perf_counter()
        self._last: float | None = None

    def step(self, total: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.metrics.observe(STEP, now - self._last, self.model)
        elif total == 1:
            self.metrics.observe(STEP, now - self._started, self.model)
        self._last = now


def snapshot(metrics: WorkerMetrics, engine: object, inputs: object) -> dict[str, Any]:
    """``metrics`` with the engine's pipeline counts and memory and the loader's LoRA cache
    counts, for a ``WorkerInfo``. Engines and loaders that count nothing add nothing."""
    counters: dict[str, dict[tuple[str, ...], float]] = {}
    gauges: dict[str, dict[tuple[str, ...], float]] = {}
    if isinstance(engine, CountsPipelines):
        counts = engine.pipeline_counts()
        for spec, which in ((LOADS, "loads"), (EVICTIONS, "evictions")):
            counters[spec.name] = {(key,): float(n) for key, n in counts.get(which, {}).items()}
    if isinstance(inputs, CountsLoraCache):
        lora = inputs.lora_cache_counts()
        counters[LORA_HITS.name] = {(): float(lora.get("hits", 0))}
        counters[LORA_MISSES.name] = {(): float(lora.get("misses", 0))}
    memory: dict[tuple[str, ...], float] = {}
    rss = process_rss_bytes()
    if rss is not None:
        memory[("rss",)] = float(rss)
    if isinstance(engine, ReportsDeviceMemory):
        memory.update({(kind,): float(n) for kind, n in engine.device_memory().items()})
    gauges[MEMORY.name] = memory
    return metrics.snapshot(counters=counters, gauges=gauges)
