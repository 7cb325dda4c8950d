"""Jobs and their results: plain data shared by the store, the worker and the API. No I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


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
class JobResult:
    """What a completed job produced. The image bytes live in the media store under media_id."""

    media_id: str
    content_type: str
    width: int
    height: int
    seed: int
    inference_time_s: float
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "media_id": self.media_id,
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "inference_time_s": self.inference_time_s,
            "size_bytes": self.size_bytes,
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
        )


@dataclass
class Job:
    """One accepted request, as the store keeps it.

    ``params`` is the validated request (``GenerationRequest.to_dict()``), with the seed already
    resolved, so a retried job reproduces the same image. Times are Unix seconds.
    """

    id: str
    slug: str
    key_id: str
    params: dict[str, Any]
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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def queue_time_s(self) -> float | None:
        if self.started_at is None:
            return None
        return max(0.0, self.started_at - self.created_at)
