"""Operations endpoints: /healthz and /readyz for load balancers, /metrics for Prometheus and
autoscalers."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel

from qwenserve.api.errors import error_responses
from qwenserve.api.key_metrics import KeyGpuSeconds, KeyLoads
from qwenserve.api.metrics import JobOutcomes, WorkerFiguresCollector
from qwenserve.api.schemas import HealthBody
from qwenserve.api.services import Services
from qwenserve.store import rules

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="200 once the server can take work", response_model=HealthBody)
async def healthz(request: Request) -> JSONResponse:
    services: Services = request.app.state.services
    stats = await services.call(services.store.stats, now=services.clock())
    return JSONResponse(
        {
            "status": "ok",
            # A claimed job waiting behind a running batch is still queued to a watcher.
            "queued": sum(stats.waiting_for_engine().values()),
            "processing": sum(stats.denoising().values()),
            "workers": len(await services.call(services.workers)),
        }
    )


class ReadyBody(BaseModel):
    status: str
    queued: int
    """Jobs QUEUED across the cluster."""
    max_queued: int
    """``QWENSERVE_MAX_QUEUED`` (0: no limit)."""


@router.get(
    "/readyz",
    summary="200 while a submit can be queued; 503 while the cluster's queue is full",
    response_model=ReadyBody,
    responses=error_responses(503, meanings={503: "The queue is full (QWENSERVE_MAX_QUEUED)"}),
)
async def readyz(request: Request) -> JSONResponse:
    """For load balancers: a node whose submits would all be refused (503) is not ready; its
    polls and results still work, so /healthz stays 200."""
    services: Services = request.app.state.services
    limit = services.settings.max_queued
    stats = await services.call(services.store.stats, now=services.clock())
    queued = sum(stats.queued_by_model.values())
    if limit > 0 and queued >= limit:
        raise rules.queue_full(limit)
    return JSONResponse({"status": "ok", "queued": queued, "max_queued": limit})


class QueueCollector(Collector):
    """Reads queue figures from the store at scrape time, so every API node reports the same."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        stats = self.services.store.stats(now=self.services.clock())
        queued = GaugeMetricFamily(
            "qwenserve_queue_depth",
            "Jobs not yet denoising (queued, or claimed and waiting behind a running batch)",
            labels=["model"],
        )
        for slug, count in sorted(stats.waiting_for_engine().items()):
            queued.add_metric([slug], count)
        yield queued
        processing = GaugeMetricFamily(
            "qwenserve_jobs_processing", "Jobs denoising on a worker", labels=["model"]
        )
        for slug, count in sorted(stats.denoising().items()):
            processing.add_metric([slug], count)
        yield processing
        yield GaugeMetricFamily(
            "qwenserve_oldest_queued_age_seconds",
            "Age of the oldest waiting job (0 when none)",
            value=stats.oldest_queued_age_s or 0.0,
        )
        workers = self.services.workers()
        yield GaugeMetricFamily("qwenserve_workers", "Workers alive", value=len(workers))
        busy = GaugeMetricFamily(
            "qwenserve_worker_busy", "1 while the worker runs a job", labels=["worker"]
        )
        resident = GaugeMetricFamily(
            "qwenserve_worker_resident_model",
            "1 for each base model a worker holds in memory",
            labels=["worker", "model"],
        )
        compiles = CounterMetricFamily(
            "qwenserve_worker_torch_compiles",
            "torch.compile work of a worker's engine (COMPILE): kind=compiles (graphs compiled "
            "at warm-up), recompiles (compiled after warm-up: expected 0), eager_fallbacks "
            "(block calls run eagerly for a variant warm-up missed)",
            labels=["worker", "kind"],
        )
        for worker in workers:
            busy.add_metric([worker.worker_id], 1.0 if worker.busy else 0.0)
            for base in worker.resident:
                resident.add_metric([worker.worker_id, base], 1.0)
            for kind, count in sorted(worker.compiles.items()):
                compiles.add_metric([worker.worker_id, kind], float(count))
        yield busy
        yield resident
        yield compiles


def build_registry(services: Services) -> CollectorRegistry:
    """This app's series (``api/metrics.py`` lists them); its own registry, so several apps in
    one process (tests) never share counters. ``process_*`` are the API process's own
    (``process_resident_memory_bytes``); each worker's memory comes with its figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(services))
    registry.register(WorkerFiguresCollector(services))
    registry.register(JobOutcomes(services.events))
    registry.register(KeyLoads(services))
    registry.register(KeyGpuSeconds(services.events, services.store))
    ProcessCollector(registry=registry)
    return registry


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    registry: CollectorRegistry = request.app.state.metrics_registry
    data = await services.call(generate_latest, registry)
    return Response(content=data, media_type="text/plain; version=0.0.4; charset=utf-8")
