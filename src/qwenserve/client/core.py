"""The transport-free core both clients share: URLs, headers, and the polling loop, once.

The polling loop is a generator: it yields the number of seconds to sleep before the next
status poll and receives the status body back; the sync and async clients only drive it.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import httpx

from qwenserve.client.errors import (
    InferenceFailed,
    InferenceTimeout,
    QwenServeClientError,
    raise_for_status,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_WAIT_TIMEOUT_S = 600.0
TERMINAL = ("COMPLETED", "FAILED")

PollLoop = Generator[float, dict[str, Any], None]


@dataclass(frozen=True)
class Endpoints:
    """Where v1 and v2 live, derived from a ``.../v1`` base URL as the segmind SDK does."""

    v1: str
    v2: str

    @classmethod
    def from_base_url(cls, base_url: str) -> Endpoints:
        base = base_url.rstrip("/")
        root = base.rsplit("/", 1)[0] if base.rsplit("/", 1)[-1].startswith("v") else base
        return cls(v1=root + "/v1", v2=root + "/v2")


def default_headers(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("QWENSERVE_API_KEY") or os.environ.get("SEGMIND_API_KEY")
    headers = {"User-Agent": "qwenserve-client"}
    if key:
        headers["x-api-key"] = key
    return headers


def submit_fields(response: httpx.Response) -> tuple[str, str, str, dict[str, Any]]:
    raise_for_status(response)
    body = response.json()
    try:
        return body["request_id"], body["status_url"], body["response_url"], body
    except (KeyError, TypeError):
        raise QwenServeClientError(
            response.status_code, "submit answered without request_id/status_url/response_url"
        ) from None


def terminal_tolerant_body(response: httpx.Response) -> dict[str, Any]:
    """A FAILED job is served as 422 with its body: that is an answer, not a transport error."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("status") in TERMINAL:
        return body
    raise_for_status(response)
    return body if isinstance(body, dict) else {}


def poll_until_terminal(
    request_id: str, *, timeout_s: float, interval_s: float, clock: Any
) -> Generator[float, dict[str, Any], dict[str, Any]]:
    """Yield sleep durations; receive status bodies; return the COMPLETED status body.

    Raises InferenceFailed on FAILED and InferenceTimeout past ``timeout_s``.
    """
    start = clock()
    status = yield 0.0
    while True:
        state = status.get("status")
        if state == "COMPLETED":
            return status
        if state == "FAILED":
            raise InferenceFailed(status.get("error"), status)
        elapsed = clock() - start
        if elapsed >= timeout_s:
            raise InferenceTimeout(request_id, elapsed)
        status = yield min(interval_s, max(0.0, timeout_s - elapsed))
