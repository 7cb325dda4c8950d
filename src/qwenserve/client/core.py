"""The transport-free core both clients share: URLs, headers, and the polling loop, once.

The polling loop is a generator: it yields the number of seconds to sleep before the next
status poll and receives the status body back (handing each to ``on_progress`` as a
``StatusUpdate``); the sync and async clients only drive it.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import httpx

from qwenserve.client.errors import (
    AlreadyEnded,
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
_VERSION_SEGMENT = re.compile(r"v\d+")


@dataclass(frozen=True)
class StatusUpdate:
    """One status poll, typed: what a progress bar needs (the server's live fields).

    ``queue_position`` while QUEUED; ``step``/``total_steps``/``fraction`` while denoising;
    ``waiting`` while a worker holds the job but has not started it; ``eta_s`` when the server
    could estimate it. ``body`` is the whole status body.
    """

    status: str
    request_id: str | None = None
    queue_position: int | None = None
    step: int | None = None
    total_steps: int | None = None
    fraction: float | None = None
    waiting: bool = False
    eta_s: float | None = None
    cancel_requested: bool = False
    error: str | None = None
    body: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> StatusUpdate:
        raw = body.get("progress")
        progress: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return cls(
            status=str(body.get("status", "")),
            request_id=body.get("request_id"),
            queue_position=body.get("queue_position"),
            step=progress.get("step"),
            total_steps=progress.get("total_steps"),
            fraction=progress.get("fraction"),
            waiting=bool(body.get("waiting", False)),
            eta_s=body.get("eta_s"),
            cancel_requested=bool(body.get("cancel_requested", False)),
            error=body.get("error"),
            body=body,
        )


OnProgress = Callable[[StatusUpdate], object]


@dataclass(frozen=True)
class Endpoints:
    """Where v1 and v2 live, derived from a ``.../v1`` base URL as the segmind SDK does."""

    v1: str
    v2: str

    @classmethod
    def from_base_url(cls, base_url: str) -> Endpoints:
        """``http://h:8000/v1``, ``.../v2`` or the bare ``http://h:8000`` alike."""
        base = base_url.rstrip("/")
        head, _, last = base.rpartition("/")
        root = head if head and _VERSION_SEGMENT.fullmatch(last) else base
        return cls(v1=root + "/v1", v2=root + "/v2")

    def cancel_url(self, request_id: str) -> str:
        return f"{self.v2}/requests/{request_id}/cancel"


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


def inline_output(result: dict[str, Any]) -> bytes | None:
    """A COMPLETED result's image when it came inline (``base64`` asked); None for a URL."""
    output = result.get("output")
    if not isinstance(output, str) or not output:
        raise QwenServeClientError(None, "the result has no output (not COMPLETED?)")
    if output.startswith(("http://", "https://")):
        return None
    try:
        return base64.b64decode(output, validate=True)
    except ValueError:
        raise QwenServeClientError(
            None, "the result's output is neither a URL nor base64"
        ) from None


def cancel_answer(response: httpx.Response) -> dict[str, Any]:
    """The job's status body after a cancel (200: ended; 202: stops at its next step).

    Raises AlreadyEnded (409) when it had finished first, QwenServeClientError otherwise.
    """
    if response.status_code == 409:
        body = response.json()
        raise AlreadyEnded(str(body.get("error")), str(body.get("status")))
    raise_for_status(response)
    answer: dict[str, Any] = response.json()
    return answer


def poll_until_terminal(
    request_id: str,
    *,
    timeout_s: float,
    interval_s: float,
    clock: Any,
    on_progress: OnProgress | None = None,
) -> Generator[float, dict[str, Any], dict[str, Any]]:
    """Yield sleep durations; receive status bodies; return the COMPLETED status body.

    Each body received goes to ``on_progress`` (terminal ones too) before it is judged.
    Raises InferenceFailed on FAILED and InferenceTimeout past ``timeout_s``.
    """
    start = clock()
    status = yield 0.0
    while True:
        if on_progress is not None:
            on_progress(StatusUpdate.from_body(status))
        state = status.get("status")
        if state == "COMPLETED":
            return status
        if state == "FAILED":
            raise InferenceFailed(status.get("error"), status)
        elapsed = clock() - start
        if elapsed >= timeout_s:
            raise InferenceTimeout(request_id, elapsed)
        status = yield min(interval_s, max(0.0, timeout_s - elapsed))
