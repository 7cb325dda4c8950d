"""`qwenserve worker`: a worker process with no API (scale-out: one per GPU, sharing Redis)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from qwenserve.backends import open_backend
from qwenserve.catalog import MODELS
from qwenserve.cli.common import add_settings_options, configure_logging, settings_from
from qwenserve.cli.compose import (
    build_workers,
    check_weights,
    push_cancels,
    start_wakeup,
    stop_engines,
    warm_up,
)
from qwenserve.notify import EventFollower
from qwenserve.worker.host import ThreadHost

log = logging.getLogger("qwenserve")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("worker", help="run a worker (no API) against a shared store")
    add_settings_options(parser)
    parser.add_argument("--weights", help="tiny (default), hub, or a weights folder")
    parser.add_argument(
        "--models", default="", help="comma-separated slugs to serve (default: all)"
    )
    parser.add_argument("--count", type=int, default=1, help="worker threads in this process")
    parser.set_defaults(handler=_worker)


def _worker(args: argparse.Namespace) -> int:
    settings = settings_from(args, weights="weights")
    configure_logging(settings.log_level)
    slugs = [m.strip() for m in args.models.split(",") if m.strip()] or None
    unknown = [m for m in slugs or () if m not in MODELS]
    if unknown:
        raise SystemExit(f"qwenserve worker: unknown model(s): {', '.join(unknown)}")
    if args.count < 1:
        raise SystemExit("qwenserve worker: --count must be at least 1")
    check_weights(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    backend = open_backend(settings)
    workers = build_workers(settings, backend, count=args.count, slugs=slugs)
    runners = [worker.runner for worker in workers]
    log.info(  # one line for all workers: they share one configuration
        "engine: %s; %d worker(s)", workers[0].engine.describe(), len(workers)
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    warm_up(settings, workers, slugs)
    host = ThreadHost(runners)
    wakeup = start_wakeup(backend, runners, slugs)
    # Cancel requests from any node, read from the event log (at once on Redis's cancel
    # channel; every event_poll_s otherwise), stop the job here at its next step.
    events = EventFollower(backend.store, poll_s=settings.event_poll_s).start()
    cancels = push_cancels(backend, events, runners)
    host.start()
    log.info("%d worker(s) serving %s", len(runners), ", ".join(slugs or ["all models"]))
    stop.wait()
    for subscriber in (wakeup, cancels):
        if subscriber is not None:
            subscriber.close()
    host.shutdown(settings.drain_timeout_s)
    stop_engines(workers)
    events.close()
    backend.close()
    return 0
