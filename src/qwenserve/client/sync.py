"""The blocking client: the segmind SDK's surface over httpx."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from qwenserve.client.core import (
    DEFAULT_BASE_URL,
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_WAIT_TIMEOUT_S,
    Endpoints,
    OnProgress,
    cancel_answer,
    default_headers,
    inline_output,
    poll_until_terminal,
    submit_fields,
    terminal_tolerant_body,
)
from qwenserve.client.errors import raise_for_status


@dataclass
class Job:
    """A submitted v2 request: ``status()``, ``result()``, ``wait()``, ``cancel()``."""

    request_id: str
    status_url: str
    response_url: str
    submit_response: dict[str, Any]
    cancel_url: str
    _http: httpx.Client = field(repr=False)

    def status(self) -> dict[str, Any]:
        return terminal_tolerant_body(self._http.get(self.status_url))

    def result(self) -> dict[str, Any]:
        return terminal_tolerant_body(self._http.get(self.response_url))

    def cancel(self) -> dict[str, Any]:
        """Stop the request: a queued one ends at once (refunded), a running one at its next
        denoising step. Returns its status body; raises AlreadyEnded if it had finished."""
        return cancel_answer(self._http.post(self.cancel_url))

    def wait(
        self,
        timeout: float = DEFAULT_WAIT_TIMEOUT_S,
        interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: OnProgress | None = None,
    ) -> dict[str, Any]:
        """Poll until COMPLETED (returns the result body); raises InferenceFailed/Timeout.

        ``on_progress`` gets a ``StatusUpdate`` for each poll (queue position, steps, ETA).
        """
        loop = poll_until_terminal(
            self.request_id,
            timeout_s=timeout,
            interval_s=interval,
            clock=time.monotonic,
            on_progress=on_progress,
        )
        delay = next(loop)
        try:
            while True:
                if delay:
                    time.sleep(delay)
                delay = loop.send(self.status())
        except StopIteration:
            return self.result()


class QwenServeClient:
    """``run`` (v2 submit + wait), ``run_sync`` (v1), ``submit_async`` (v2 → Job), ``credits``.

    The key comes from ``api_key`` or ``QWENSERVE_API_KEY`` (or ``SEGMIND_API_KEY``).
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoints = Endpoints.from_base_url(base_url)
        self._http = httpx.Client(
            headers=default_headers(api_key),
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
        )

    def __enter__(self) -> QwenServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def run_sync(self, slug: str, **params: Any) -> httpx.Response:
        """POST /v1/{slug}: the image bytes (or JSON with base64) once it is done."""
        response = self._http.post(f"{self.endpoints.v1}/{slug}", json=params)
        raise_for_status(response)
        return response

    def submit_async(self, slug: str, **params: Any) -> Job:
        """POST /v2/{slug}: a Job handle to poll."""
        response = self._http.post(f"{self.endpoints.v2}/{slug}", json=params)
        request_id, status_url, response_url, body = submit_fields(response)
        return Job(
            request_id,
            status_url,
            response_url,
            body,
            self.endpoints.cancel_url(request_id),
            self._http,
        )

    def run(self, slug: str, **params: Any) -> dict[str, Any]:
        """Submit through v2 and wait (600 s, polling every second) for the result body."""
        return self.submit_async(slug, **params).wait()

    def image(self, result: dict[str, Any]) -> bytes:
        """The image of a COMPLETED result body: fetched from its URL, or decoded when inline."""
        data = inline_output(result)
        if data is not None:
            return data
        response = self._http.get(result["output"])
        raise_for_status(response)
        return response.content

    def credits(self) -> float:
        response = self._http.get(f"{self.endpoints.v1}/get-user-credits")
        raise_for_status(response)
        return float(response.json()["credits"])
