"""create_app: the FastAPI application over injected services (workers are never imported)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from qwenserve import __version__
from qwenserve.api import history, media, metrics, models, openai_images, ops, playground, v1, v2
from qwenserve.api.body import BodyLimit
from qwenserve.api.docs import create_documented_app
from qwenserve.api.errors import install_error_handlers
from qwenserve.api.query import SingleValuedQuery
from qwenserve.api.services import Services
from qwenserve.errors import ServiceUnavailable

log = logging.getLogger("qwenserve.api")


async def _purge_loop(services: Services) -> None:
    """Delete expired results and their media (reads already treat them as gone). The jobs it
    ended on the way (expired unfinished, missed start deadlines) get what every ending gets
    (``Services.endings``, handed the jobs as they were)."""
    while True:
        try:
            expired = await services.call(services.store.purge_expired, now=services.clock())
            if expired.events:
                await services.call(services.endings.handle, expired.events, *expired)
            for job in expired:
                if job.result is not None:  # the removal of a result, not an ending
                    await services.call(services.media.delete, job.result.media_id)
            await services.call(services.media.purge_expired, now=services.clock())
            if expired:
                log.info("purged %d expired results", len(expired))
        except ServiceUnavailable as error:  # an outage (store, bucket): one line, next round
            log.warning("purging expired results failed: %s", error.message)
        except Exception:
            log.exception("purging expired results failed")
        await asyncio.sleep(services.settings.purge_interval_s)


def create_app(services: Services) -> FastAPI:
    """The API over ``services``; the caller starts workers (or none) separately."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The event-log reader runs on its own thread while the app serves, unless the
        # composition root started (and will close) it.
        reader = None if services.events.running else services.events.start()
        purge = asyncio.create_task(_purge_loop(services))
        try:
            yield
        finally:
            purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purge
            if reader is not None:
                await asyncio.to_thread(reader.close)

    app = create_documented_app(
        title="qwenserve",
        version=__version__,
        summary="Segmind-compatible serving for the Qwen-Image models",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.metrics_registry = ops.build_registry(services)
    metrics.instrument(app, app.state.metrics_registry)
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(SingleValuedQuery)
    # Routes are matched in order: the queue's polls and submits, most of the traffic, first.
    app.include_router(v2.router)
    app.include_router(v1.router)
    app.include_router(media.router)
    app.include_router(ops.router)
    app.include_router(models.router)
    app.include_router(openai_images.router)
    app.include_router(history.router)
    app.include_router(playground.router)
    return app
