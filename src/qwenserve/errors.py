"""The one exception tree of qwenserve.

Every error a client can see is one of these. Each class carries the HTTP status it maps to, so
the API's error mapping (``qwenserve.api.errors``) is the only place that turns them into
responses, and nothing else invents status codes. This module imports nothing from the web layer.

::

    QwenServeError                      500  base; never shown with a stack trace
    ├── InvalidRequest                  400  parameters missing, mistyped or out of range; carries
    │                                        every bad field (``errors``: FieldError list)
    │   ├── InvalidInput                400  an input image or LoRA file is unusable
    │   │   └── InputUnavailable        400  an input URL the caller named could not be fetched
    │   │                                    (HTTP error status, unknown host, no answer in time)
    │   └── BodyTooLarge                413  the request body passed the size limit (as it streamed)
    ├── Unauthenticated                 401  missing or unknown API key
    ├── Forbidden                       403  the key may not use this model
    ├── NotFound                        404
    │   ├── UnknownModel                404  no such slug
    │   └── UnknownRequest              404  no such request id (or expired, or another key's)
    ├── InsufficientCredits             406  the balance cannot pay for the run
    ├── Conflict                        409  the request no longer fits the job's state
    │                                        (cancel of a finished job); carries job_status
    │   └── Cancelled                   409  the job was cancelled by its owner (v1's answer)
    ├── ContentPolicyViolation          422  the operator's content policy blocked a prompt, an
    │                                        input or an output image (kind ``content_policy``)
    ├── RateLimited                     429  requests-per-minute limit hit; carries retry_after_s
    ├── KeyQueueFull                    429  the key has its ``max_queued`` jobs waiting already
    ├── UpstreamError                   502  a fetch failed (the fetcher's own; a caller's input
    │                                        URL is answered as InputUnavailable instead)
    ├── UpstreamTimeout                 504  a fetch, or v1's wait for the result, timed out
    ├── InferenceError                  500  the engine failed while running a job
    │   ├── OutOfMemory                 500  the device ran out of memory for this size x batch
    │   └── EngineCrashed               500  the engine's process died mid-job (killed, a
    │                                        segfault, the OOM killer); its jobs run again
    └── ServiceUnavailable              503  shutting down or no worker can take the job
        ├── StoreUnavailable            503  the store is unreachable or failing over (Redis
        │                                    restarting, Sentinel promoting a replica)
        │   └── NotReplicated           503  a submit Redis did not confirm on
        │                                    QWENSERVE_REDIS_MIN_REPLICAS replicas in time
        │                                    (the job was withdrawn, refunded)
        ├── MediaUnavailable            503  the media store (S3 bucket) is unreachable or
        │                                    refuses us; at a job's finish, retried, then the
        │                                    job fails refunded (kind ``media_unavailable``)
        ├── QueueFull                   503  the cluster holds QWENSERVE_MAX_QUEUED jobs already
        └── StartTimeout                503  a job's X-Start-Timeout passed before it started
                                             (kind ``start_timeout``; ended, refunded)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from qwenserve.jobs import CANCELLED, EXPIRED

BODY_FIELD = "body"
"""The ``field`` of a problem with the request body as a whole (malformed JSON, not an object)."""
# How an input error's message names its field: "image: …", or "prompt is … tokens long".
_FIELD_PREFIX = re.compile(r"([a-z_][a-z0-9_]*)(?:: | is )")


class QwenServeError(Exception):
    """Base of every qwenserve error: a message safe to show to a client."""

    http_status: ClassVar[int] = 500
    kind: ClassVar[str | None] = None
    """The stored failure kind (``error_kind``) when it is not the class name."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class FieldError:
    """One bad field of a request body: its name and a readable message that names it."""

    field: str
    message: str


class InvalidRequest(QwenServeError):
    """Request parameters are missing, of the wrong type, out of range or not allowed.

    ``errors`` lists every bad field (a client fixes them all in one round trip); ``message``
    stays one readable string naming each of them, since that is what Segmind's SDK shows.
    ``field`` is the first bad field. Raise one for many fields with ``from_errors``; a
    single-field ``InvalidRequest(msg, field=name)`` lists itself. ``errors`` is never empty:
    a problem of the body as a whole (malformed JSON, not an object) is listed under ``body``.
    """

    http_status = 400

    def __init__(
        self, message: str, *, field: str | None = None, errors: Sequence[FieldError] = ()
    ) -> None:
        if field is None and errors:
            field = errors[0].field
        super().__init__(message, field=field)
        if not errors:
            errors = (FieldError(BODY_FIELD if field is None else field, message),)
        self.errors: tuple[FieldError, ...] = tuple(errors)

    @classmethod
    def from_errors(cls, errors: Sequence[FieldError]) -> InvalidRequest:
        """One error for every bad field: the messages joined with "; " in one string."""
        if not errors:
            raise ValueError("from_errors needs at least one FieldError")
        if len(errors) == 1:
            return cls(errors[0].message, field=errors[0].field)
        return cls("; ".join(e.message for e in errors), errors=errors)


class InvalidInput(InvalidRequest):
    """An input (image or LoRA file) was read but cannot be used: bad format, too large, …"""


class InputUnavailable(InvalidInput):
    """An input URL the caller named could not be fetched: its host does not resolve or
    refuses the connection, it answers an HTTP error status, or it does not answer in time.
    The caller's input is at fault (a 4xx naming the field), not this server."""


class BodyTooLarge(InvalidRequest):
    """The request body is larger than the server takes; refused while it streams in."""

    http_status = 413


class Unauthenticated(QwenServeError):
    """No API key was given, or it is unknown or revoked."""

    http_status = 401


class Forbidden(QwenServeError):
    """The API key exists but is not allowed to use this model."""

    http_status = 403


class NotFound(QwenServeError):
    """Something addressed by the URL does not exist."""

    http_status = 404


class UnknownModel(NotFound):
    """The slug is not one this server serves."""


class UnknownRequest(NotFound):
    """The request id is unknown, expired, or belongs to another key."""


class InsufficientCredits(QwenServeError):
    """The key's balance is below the model's price per run."""

    http_status = 406


class Conflict(QwenServeError):
    """The job is in a state the request cannot apply to (e.g. cancelling a finished job).

    ``job_status`` is the job's status (``JobStatus`` value) so the API can say it.
    """

    http_status = 409

    def __init__(self, message: str, *, job_status: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.job_status = job_status


class Cancelled(Conflict):
    """The job was cancelled by its owner before it finished (and refunded).

    What a v1 caller waiting on a job that got cancelled (through v2, or by its own
    disconnect) is answered: 409, since the request conflicts with what became of its job.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, job_status="FAILED", field=field)


class ContentPolicyViolation(QwenServeError):
    """The operator's content policy (``qwenserve.policy``) blocked the request: a blocked term
    in a prompt, or an input or output image its classifier flagged. The message says which
    stage blocked it and never echoes the matched term. Stored as kind ``content_policy``."""

    http_status = 422
    kind = "content_policy"


class RateLimited(QwenServeError):
    """The key sent more requests this minute than it may."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float, limit: int, reset_at: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.reset_at = reset_at


class KeyQueueFull(QwenServeError):
    """The key already has as many jobs waiting as its ``max_queued`` allows (backpressure)."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float, limit: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit


class UpstreamError(QwenServeError):
    """An input URL could not be fetched (connection refused, HTTP error status, …)."""

    http_status = 502


class UpstreamTimeout(QwenServeError):
    """An input URL did not answer in time."""

    http_status = 504


class InferenceError(QwenServeError):
    """The engine failed while running a job (out of memory, a bug, a crashed worker)."""

    http_status = 500


class OutOfMemory(InferenceError):
    """The device ran out of memory generating this size and batch; the engine freed what the
    call held. The worker retries a batch in halves; a single request fails with this error."""


class EngineCrashed(InferenceError):
    """The engine's child process died while it held this job (SIGKILL, a segfault in a kernel,
    an abort in a native library, the OOM killer). The worker's parent process lives on: the job
    goes back to the queue with the attempt counted, and after ``max_attempts`` fails with this
    error, refunded (``worker/engine_process.py``)."""


class ServiceUnavailable(QwenServeError):
    """The server cannot take work right now (shutting down, no worker for the model, the
    store unreachable). ``retry_after_s``, when known, is said in ``Retry-After``."""

    http_status = 503

    def __init__(
        self, message: str, *, field: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class StoreUnavailable(ServiceUnavailable):
    """The job store cannot be reached for now: Redis restarting, or Sentinel promoting a
    replica after the primary died. Said with ``Retry-After``; nothing was half-done (each store
    call is one atomic step), so the same request can simply be sent again."""


class NotReplicated(StoreUnavailable):
    """Redis did not confirm a submit on ``QWENSERVE_REDIS_MIN_REPLICAS`` replicas within the
    wait: a primary dying now could lose it, so the job was withdrawn (refunded, its
    idempotency record dropped) rather than accepted. Sending it again is safe."""


class MediaUnavailable(ServiceUnavailable):
    """The media store (an S3 bucket: ``media/s3.py``) cannot be reached or refuses the call.
    A read answers 503; a worker's finish retries the write (the image kept) and then fails
    the job refunded with this kind. The cause goes to the log, never to a client."""

    kind = "media_unavailable"


class QueueFull(ServiceUnavailable):
    """The cluster's queue holds ``QWENSERVE_MAX_QUEUED`` jobs: nothing more is taken for now
    (``GET /readyz`` says 503 meanwhile)."""


class StartTimeout(ServiceUnavailable):
    """A job's start deadline (``X-Start-Timeout``) passed before its compute began: it ended
    unrun, refunded."""

    kind = "start_timeout"


_BY_NAME: dict[str, type[QwenServeError]] = {
    cls.__name__: cls
    for cls in (
        QwenServeError,
        InvalidRequest,
        InvalidInput,
        InputUnavailable,
        Unauthenticated,
        Forbidden,
        NotFound,
        UnknownModel,
        UnknownRequest,
        InsufficientCredits,
        UpstreamError,
        UpstreamTimeout,
        InferenceError,
        OutOfMemory,
        EngineCrashed,
        ServiceUnavailable,
        MediaUnavailable,
        StartTimeout,
        ContentPolicyViolation,
    )
}
_BY_KIND: dict[str, type[QwenServeError]] = {
    error_cls.kind or name: error_cls for name, error_cls in _BY_NAME.items()
}


def error_kind(error: QwenServeError) -> str:
    """The stable name a stored job failure keeps, so it can be rebuilt in another process: the
    class's ``kind`` where it has one (``content_policy``), else the class name."""
    return type(error).kind or type(error).__name__


def rebuild_error(kind: str | None, message: str) -> QwenServeError:
    """Rebuild a stored job failure (kind + message) as the typed error it was.

    The two endings that are no error of the job's own map to what a client should read: a
    ``cancelled`` job is ``Cancelled`` (409), an ``expired`` one ``UnknownRequest`` (404, as
    every expired request reads). Unknown kinds are an ``InferenceError`` (500). An input error
    gets its field back from its message (``"<field>: …"`` or ``"<field> is …"``).
    """
    if kind == CANCELLED:
        return Cancelled(message)
    if kind == EXPIRED:
        return UnknownRequest(message)
    error_cls = _BY_KIND.get(kind or "", InferenceError)
    if issubclass(error_cls, InvalidRequest):
        named = _FIELD_PREFIX.match(message)
        return error_cls(message, field=named.group(1) if named else None)
    return error_cls(message)
