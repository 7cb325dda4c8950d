"""Jobs, their progress, results and events: plain data shared by the store, the worker and the
API. No I/O; turned into stored records and back only inside the stores (``store/records.py``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing only: the catalog imports errors, which import this module
    from qwenserve.catalog.request import GenerationRequest
    from qwenserve.catalog.sizes import OutputSize

CANCELLED = "cancelled"
"""``Job.error_kind`` of a job its owner cancelled (refunded)."""

EXPIRED = "expired"
"""``Job.error_kind`` announced for a job that reached ``expires_at`` before it finished
(refunded, then purged)."""


class JobStatus(enum.StrEnum):
    """The four states of the Segmind v2 queue, spelled as the API shows them."""

    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


@dataclass(frozen=True)
class Progress:
    """How far a running job got, as its worker reports it (denoising steps done of all)."""

    step: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.step <= self.total_steps:
            raise ValueError(f"invalid progress {self.step}/{self.total_steps}")

    @property
    def fraction(self) -> float:
        """Done share in [0, 1], for a progress bar."""
        return self.step / self.total_steps


@dataclass(frozen=True)
class JobProgress(Progress):
    """A job's last reported progress and when the store recorded it (a stale ``updated_at``
    tells a watcher the worker went quiet)."""

    updated_at: float


class JobEventType(enum.StrEnum):
    """What a job event announces: one per transition of the job."""

    QUEUED = "queued"
    """Accepted (submit), or given back to the queue (release) to run again."""
    PROCESSING = "processing"
    """Claimed by a worker (``attempt`` counts the tries, a reclaimed lease included)."""
    CANCEL_REQUESTED = "cancel_requested"
    """Its owner asked to stop it while a worker runs it; a ``failed`` (or ``completed``, when
    the worker finished first) follows."""
    COMPLETED = "completed"
    FAILED = "failed"
    """Ended without a result: ``error_kind`` says why (an error class name, ``cancelled``,
    ``expired``)."""

    @property
    def is_terminal(self) -> bool:
        return self in (JobEventType.COMPLETED, JobEventType.FAILED)


@dataclass(frozen=True)
class JobEvent:
    """One entry of the store's durable event log, written in the same atomic step as the
    transition it announces, so a consumer that reads the log misses nothing.

    ``id`` is opaque and ordered by the store (pass it back as ``after`` to resume); compare
    events by their position in a reply, not by the text of their ids.
    """

    id: str
    job_id: str
    key_id: str
    slug: str
    type: JobEventType
    at: float
    attempt: int = 0
    error_kind: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class JobResult:
    """What a completed job produced. The image bytes live in the media store under media_id."""

    media_id: str
    content_type: str
    width: int
    height: int
    seed: int
    inference_time_s: float
    size_bytes: int
    encode_time_s: float = 0.0
    """Seconds the worker spent encoding the image (0 in results stored before it was kept)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "media_id": self.media_id,
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "inference_time_s": self.inference_time_s,
            "size_bytes": self.size_bytes,
            "encode_time_s": self.encode_time_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        return cls(
            media_id=str(data["media_id"]),
            content_type=str(data["content_type"]),
            width=int(data["width"]),
            height=int(data["height"]),
            seed=int(data["seed"]),
            inference_time_s=float(data["inference_time_s"]),
            size_bytes=int(data["size_bytes"]),
            encode_time_s=float(data.get("encode_time_s", 0.0)),
        )


@dataclass
class Job:
    """One accepted request, as the store keeps it.

    ``request`` is the validated, typed request from admission to the end: its slug, its seed
    (already drawn, so a retried job reproduces the same image) and its output size
    (``request.size``, fixed at admission: ``catalog/sizes.py``) are decided once there and
    never derived again. Times are Unix seconds.
    """

    id: str
    key_id: str
    request: GenerationRequest
    status: JobStatus
    created_at: float
    expires_at: float
    cost_usd: float
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    result: JobResult | None = None
    error: str | None = None
    error_kind: str | None = None
    worker_id: str | None = None
    lease_until: float | None = None
    progress: JobProgress | None = None
    """The running attempt's last reported progress; None before the first report and again
    when the job goes back to the queue (a new attempt starts over). Kept once it ended."""
    cancel_requested_at: float | None = None
    """When its owner asked to cancel it while it was running (the worker then stops it)."""
    webhook_url: str | None = None
    """Where its ending is POSTed (``POST /v2/{slug}?webhook=URL``; notify/webhooks.py)."""
    start_by: float | None = None
    """Its start deadline (``X-Start-Timeout``): not started by then, it ends FAILED
    (``start_timeout``), refunded; None: it waits as long as it must."""

    @property
    def slug(self) -> str:
        """The model it runs (its request's, resolved at admission)."""
        return self.request.slug

    @property
    def size(self) -> OutputSize:
        """Its output size, fixed at admission."""
        return self.request.size

    @property
    def queue_time_s(self) -> float | None:
        if self.started_at is None:
            return None
        return max(0.0, self.started_at - self.created_at)
