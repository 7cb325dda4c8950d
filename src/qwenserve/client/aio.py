"""The asyncio client: the same surface as QwenServeClient, awaitable."""

from __future__ import annotations

import asyncio
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
class AsyncJob:
    """A submitted v2 request: ``await status()``, ``result()``, ``wait()``, ``cancel()``."""

    request_id: str
    status_url: str
    response_url: str
    submit_response: dict[str, Any]
    cancel_url: str
    _http: httpx.AsyncClient = field(repr=False)

    async def status(self) -> dict[str, Any]:
        return terminal_tolerant_body(await self._http.get(self.status_url))

    async def result(self) -> dict[str, Any]:
        return terminal_tolerant_body(await self._http.get(self.response_url))

    async def cancel(self) -> dict[str, Any]:
        """See ``Job.cancel``."""
        return cancel_answer(await self._http.post(self.cancel_url))

    async def wait(
        self,
        timeout: float = DEFAULT_WAIT_TIMEOUT_S,
        interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: OnProgress | None = None,
    ) -> dict[str, Any]:
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
                    await asyncio.sleep(delay)
                delay = loop.send(await self.status())
        except StopIteration:
            return await self.result()


class AsyncQwenServeClient:
    """Awaitable twin of QwenServeClient."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoints = Endpoints.from_base_url(base_url)
        self._http = httpx.AsyncClient(
            headers=default_headers(api_key),
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
        )

    async def __aenter__(self) -> AsyncQwenServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def run_sync(self, slug: str, **params: Any) -> httpx.Response:
        response = await self._http.post(f"{self.endpoints.v1}/{slug}", json=params)
        raise_for_status(response)
        return response

    async def submit_async(self, slug: str, **params: Any) -> AsyncJob:
        response = await self._http.post(f"{self.endpoints.v2}/{slug}", json=params)
        request_id, status_url, response_url, body = submit_fields(response)
        return AsyncJob(
            request_id,
            status_url,
            response_url,
            body,
            self.endpoints.cancel_url(request_id),
            self._http,
        )

    async def run(self, slug: str, **params: Any) -> dict[str, Any]:
        job = await self.submit_async(slug, **params)
        return await job.wait()

    async def image(self, result: dict[str, Any]) -> bytes:
        """The image of a COMPLETED result body: fetched from its URL, or decoded when inline."""
        data = inline_output(result)
        if data is not None:
            return data
        response = await self._http.get(result["output"])
        raise_for_status(response)
        return response.content

    async def credits(self) -> float:
        response = await self._http.get(f"{self.endpoints.v1}/get-user-credits")
        raise_for_status(response)
        return float(response.json()["credits"])
