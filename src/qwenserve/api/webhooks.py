"""Webhooks at the API: ``?webhook=URL`` on a v2 submit (checked, kept with the job), the
``webhook`` field of a request's status and result bodies. Sending is ``notify/webhooks.py``'s,
and so is the body each delivery POSTs (the request's ``GET /v2/requests/{id}`` body, from the
same builder as the API's: ``notify/bodies.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from fastapi import Request

from qwenserve.api.services import Services
from qwenserve.errors import InvalidRequest
from qwenserve.jobs import Job
from qwenserve.media.fetch import refuse_literal_private_host
from qwenserve.notify.webhooks import MAX_URL_CHARS, delivery_body
from qwenserve.store.webhooks import DeliveryStatus

FIELD = "webhook"


def webhook_url(request: Request, *, allow_private: bool) -> str | None:
    """The ``webhook`` query parameter of a v2 submit, checked (None when absent).

    Raises:
        InvalidRequest: naming ``webhook``: not http(s), longer than 2048 characters, no host,
            or a host written as a private/loopback address (unless private URLs are allowed).
    """
    value = request.query_params.get(FIELD)  # one at most: api/query.py refuses repeats
    if value is None:
        return None
    url = value.strip()
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest(
            f"webhook: the URL is longer than {MAX_URL_CHARS} characters", field=FIELD
        )
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise InvalidRequest("webhook: not a valid URL", field=FIELD) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidRequest("webhook: the URL must be http(s) with a host", field=FIELD)
    if parsed.userinfo:
        raise InvalidRequest("webhook: the URL must not contain credentials", field=FIELD)
    if not allow_private:
        refuse_literal_private_host(url, field=FIELD)
    return url


def refuse_on_v1(request: Request) -> None:
    """v1 waits for its answer: a webhook there is a 400 naming ``webhook``."""
    if FIELD in request.query_params:
        raise InvalidRequest(
            "webhook: webhooks are for queued requests: submit to /v2/{model}?webhook=URL",
            field=FIELD,
        )


async def webhook_fields(services: Services, job: Job) -> dict[str, Any]:
    """``{"webhook": {url, status, attempts, next_retry_at}}`` for a job that named one."""
    if job.webhook_url is None:
        return {}
    delivery = await services.call(services.store.get_webhook, job.id)
    if delivery is None:  # not ended yet (or not yet picked up from the log)
        return {
            FIELD: {
                "url": job.webhook_url,
                "status": DeliveryStatus.PENDING.value,
                "attempts": [],
                "next_retry_at": None,
            }
        }
    return {FIELD: delivery.to_dict()}


def body_builder(services: Services) -> Callable[[str], str | None]:
    """What a delivery POSTs for a job: its ``GET /v2/requests/{id}`` body, less the
    ``webhook`` field (None once the job is gone), rendered from the job alone
    (``notify.webhooks.delivery_body``). Absolute URLs use ``public_url``, else the server's
    own address. Called on the dispatcher's threads."""
    return delivery_body(
        services.store, services.media, base_url=services.own_base_url(), clock=services.clock
    )
