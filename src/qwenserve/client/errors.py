"""Client exceptions, mirroring the segmind SDK's names so code moves over unchanged.

::

    QwenServeClientError     any non-success answer (status, detail)
    ├── InferenceFailed      the request ended FAILED (detail, status_body)
    ├── InferenceTimeout     wait() ran out of time before a terminal state (request_id)
    └── AlreadyEnded         cancel() of a request that had already ended (409; job_status)
"""

from __future__ import annotations

from typing import Any

import httpx


class QwenServeClientError(Exception):
    """A non-success answer from the server: ``status`` and the server's ``detail``."""

    def __init__(self, status: int | None, detail: str | None) -> None:
        super().__init__(f"{status}: {detail}" if status is not None else str(detail))
        self.status = status
        self.detail = detail

    @classmethod
    def from_response(cls, response: httpx.Response) -> QwenServeClientError:
        try:
            body = response.json()
        except ValueError:
            body = None
        detail = body.get("error") if isinstance(body, dict) else None
        return cls(response.status_code, detail or response.text[:500] or None)


class InferenceFailed(QwenServeClientError):
    """The request reached FAILED; ``detail`` is the server's error."""

    def __init__(self, detail: str | None, status_body: dict[str, Any]) -> None:
        super().__init__(None, detail)
        self.status_body = status_body


class InferenceTimeout(QwenServeClientError):
    """``wait()`` timed out; the request may still finish: poll it again later."""

    def __init__(self, request_id: str, elapsed_s: float) -> None:
        super().__init__(None, f"request {request_id!r} did not finish within {elapsed_s:.1f}s")
        self.request_id = request_id
        self.elapsed_s = elapsed_s


class AlreadyEnded(QwenServeClientError):
    """``cancel()`` came too late: the request had ended; ``job_status`` says how."""

    def __init__(self, detail: str | None, job_status: str) -> None:
        super().__init__(409, detail)
        self.job_status = job_status


def raise_for_status(response: httpx.Response) -> None:
    if not response.is_success:
        raise QwenServeClientError.from_response(response)
