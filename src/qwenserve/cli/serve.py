"""`qwenserve serve`: the API with (by default) an in-process worker on the embedded store."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from qwenserve.api.app import create_app
from qwenserve.api.services import Services
from qwenserve.api.webhooks import body_builder
from qwenserve.backends import open_backend
from qwenserve.cli.common import add_settings_options, configure_logging, settings_from
from qwenserve.cli.compose import (
    build_workers,
    check_weights,
    load_prompt_policy,
    prompt_token_counter,
    push_cancels,
    start_done_wakeup,
    start_wakeup,
    stop_engines,
    warm_up,
)
from qwenserve.notify import CompletionHub, EventFollower
from qwenserve.notify.webhooks import WebhookDispatcher, WebhookPolicy
from qwenserve.worker.host import ThreadHost

log = logging.getLogger("qwenserve")


class _DrainingServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its own shutdown, which would kill the process before
    the workers drain; swallow it here so ``_serve`` finishes its drain and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the API server (and a worker)")
    add_settings_options(parser)
    parser.add_argument("--host", help="bind address (env QWENSERVE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env QWENSERVE_PORT, default 8000)")
    parser.add_argument("--weights", help="tiny (default), hub, or a weights folder")
    parser.add_argument("--workers", type=int, help="in-process workers (0: API only)")
    parser.add_argument("--result-ttl", type=float, dest="result_ttl_s", help="seconds")
    parser.add_argument("--public-url", help="base URL clients use behind a proxy")
    parser.add_argument(
        "--sync-timeout", type=float, dest="sync_timeout_s", help="seconds POST /v1 waits"
    )
    parser.add_argument(
        "--cancel-on-disconnect",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a POST /v1 caller that hangs up while waiting cancels its job "
        "(env QWENSERVE_CANCEL_ON_DISCONNECT, default on)",
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from(
        args,
        host="host",
        port="port",
        weights="weights",
        workers="workers",
        result_ttl_s="result_ttl_s",
        public_url="public_url",
        sync_timeout_s="sync_timeout_s",
        cancel_on_disconnect="cancel_on_disconnect",
    )
    configure_logging(settings.log_level)
    if settings.workers > 0:
        check_weights(settings)
    blocked_terms = load_prompt_policy(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    backend = open_backend(settings)
    store = backend.store
    # The process's one reader of the event log (`events`; on Redis, `done_wakeup` makes it
    # read at once): its subscribers (Services wires the hub, the endings, the SSE fan-out, ETA
    # and /metrics; the webhook dispatcher and the workers' cancel push below) all take their
    # events from its one read. Re-reading is the waiters' safety net.
    hub = CompletionHub(fallback_poll_s=settings.wait_poll_s)
    events = EventFollower(store, poll_s=settings.event_poll_s)
    # In-process ends, submits and cancels go out on the backend's signals (to this process's
    # subscribers at once; on Redis other processes hear the scripts' PUBLISH).
    signals = backend.signals
    workers = build_workers(
        settings, backend, count=settings.workers, on_job_done=signals.publish_job_end
    )
    runners = [worker.runner for worker in workers]
    # A restarted embedded store's only node: what a dead predecessor (kill -9) left running is
    # claimable now, its webhook deliveries left mid-send go again now (a shared store: leases).
    orphans, held = backend.recover_orphans(now=time.time(), with_workers=bool(runners))
    if orphans:
        log.info("requeued %d job(s) left running by a previous server", orphans)
    if held:
        log.info("retrying %d webhook delivery(ies) left mid-send by a previous server", held)
    host = ThreadHost(runners)

    services = Services(
        settings=settings,
        store=store,
        media=backend.media,
        hub=hub,
        registry=backend.registry,
        on_submitted=lambda _job_id: signals.publish_queued(None),
        # Its worker here learns it now; an API-only node has none to tell.
        on_cancel_requested=signals.publish_cancel_requested if runners else None,
        prompt_policy=blocked_terms,
        prompt_tokens=prompt_token_counter(settings, workers),
        event_reader=events,
    )
    for worker in workers:  # their endings go to this process's one endings handler
        worker.runner.finisher.endings = services.endings
    app = create_app(services)
    # Webhooks: this node's dispatcher takes the endings from the one reader, and reads the log
    # from the store's own cursor only at start (so endings during a restart are delivered too).
    dispatcher = WebhookDispatcher(
        store,
        body_for=body_builder(services),
        policy=WebhookPolicy(
            timeout_s=settings.webhook_timeout_s,
            backoff_s=settings.webhook_backoff_s,
            max_backoff_s=settings.webhook_max_backoff_s,
            max_age_s=settings.webhook_max_age_s,
            allow_private=settings.allow_private_urls,
        ),
        poll_s=settings.webhook_poll_s,
    )
    dispatcher.follow_from(events)
    dispatcher.start()
    if workers:
        log.info(  # one line for all workers: they share one configuration
            "engine: %s; %d worker(s)", workers[0].engine.describe(), len(workers)
        )
    warm_up(settings, workers, None)
    wakeup = start_wakeup(backend, runners, None)
    done_wakeup = start_done_wakeup(backend, hub, events)
    cancels = push_cancels(backend, events, runners)
    events.start()
    host.start()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    )
    server = _DrainingServer(config)
    try:
        server.run()
    finally:
        for subscriber in (wakeup, done_wakeup, cancels):
            if subscriber is not None:
                subscriber.close()
        host.shutdown(settings.drain_timeout_s)
        stop_engines(workers)
        services.close()
        dispatcher.close()
        backend.close()
    return 0
