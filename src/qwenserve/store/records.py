"""Stored records → typed data, one reader for both stores.

A SQLite row (as a dict) and a Redis hash use the same field names, so one function reads a job,
a key or an event from either. Values may arrive as text (Redis) or typed (SQLite); a missing or
NULL optional field reads as None.

A job's typed request is kept as JSON text in its ``params`` field (``request_text``) and read
back typed (``request_from_text``): the only place a request becomes text and back, so nothing
outside the stores handles a job as a dict. Its output size (``GenerationRequest.size``) is in
that text; a record written before sizes were fixed at admission has none, and gets the size its
fields give now (``catalog.sizes.fix_size``: what the runtime planned for it then).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from qwenserve.catalog import MODELS, GenerationRequest, InputImage, LoraRef
from qwenserve.catalog.sizes import OutputSize, SizeKind, fix_size
from qwenserve.jobs import Job, JobEvent, JobEventType, JobProgress, JobResult, JobStatus
from qwenserve.store.base import ApiKey
from qwenserve.store.rules import to_usd

JOB_FIELDS = (
    "id",
    "slug",
    "key_id",
    "params",
    "status",
    "created_at",
    "expires_at",
    "cost_micro",
    "attempts",
    "started_at",
    "finished_at",
    "result",
    "error",
    "error_kind",
    "worker_id",
    "lease_until",
    "progress_step",
    "progress_total",
    "progress_at",
    "cancel_requested_at",
    "webhook_url",
    "start_by",
)
"""Every stored field of a job (SQLite columns, Redis hash fields)."""

KEY_FIELDS = (
    "id",
    "key_hash",
    "name",
    "balance_micro",
    "rpm",
    "models",
    "created_at",
    "revoked",
    "max_queued",
    "weight",
    "max_running",
)
EVENT_FIELDS = ("job_id", "key_id", "slug", "type", "at", "attempt", "error_kind", "error")


def _float(value: Any) -> float | None:
    return float(value) if value is not None and value != "" else None


def _int(value: Any) -> int | None:
    return int(value) if value is not None and value != "" else None


def _text(value: Any) -> str | None:
    return str(value) if value is not None else None


def request_text(request: GenerationRequest) -> str:
    """``request`` as a job record keeps it (its ``params`` field): JSON of every field."""
    return json.dumps(dataclasses.asdict(request), ensure_ascii=False, separators=(",", ":"))


def request_from_text(text: str | bytes) -> GenerationRequest:
    """The typed request a job record keeps (``request_text``); a record from before sizes were
    fixed at admission gets its size from its fields now."""
    fields: dict[str, Any] = json.loads(text)
    fields["images"] = tuple(InputImage(**image) for image in fields.get("images", ()))
    fields["extra_loras"] = tuple(LoraRef(**lora) for lora in fields.get("extra_loras", ()))
    size = fields.get("size")
    if size is None:
        spec = MODELS.get(str(fields["slug"]))
        fields["size"] = fix_size(
            spec.recipe if spec is not None else None,
            width=fields.get("width"),
            height=fields.get("height"),
            aspect_ratio=fields.get("aspect_ratio"),
            has_images=bool(fields["images"]),
        )
    else:
        fields["size"] = OutputSize(
            kind=SizeKind(size["kind"]),
            area=int(size["area"]),
            width=_int(size.get("width")),
            height=_int(size.get("height")),
        )
    return GenerationRequest(**fields)


def job_from_record(record: Mapping[str, Any]) -> Job:
    result = record.get("result")
    step, total = _int(record.get("progress_step")), _int(record.get("progress_total"))
    progress_at = _float(record.get("progress_at"))
    progress = (
        JobProgress(step=step, total_steps=total, updated_at=progress_at)
        if step is not None and total is not None and progress_at is not None
        else None
    )
    return Job(
        id=str(record["id"]),
        key_id=str(record["key_id"]),
        request=request_from_text(record["params"]),
        status=JobStatus(record["status"]),
        created_at=float(record["created_at"]),
        expires_at=float(record["expires_at"]),
        cost_usd=to_usd(int(record["cost_micro"])),
        attempts=_int(record.get("attempts")) or 0,
        started_at=_float(record.get("started_at")),
        finished_at=_float(record.get("finished_at")),
        result=JobResult.from_dict(json.loads(result)) if result is not None else None,
        error=_text(record.get("error")),
        error_kind=_text(record.get("error_kind")),
        worker_id=_text(record.get("worker_id")),
        lease_until=_float(record.get("lease_until")),
        progress=progress,
        cancel_requested_at=_float(record.get("cancel_requested_at")),
        webhook_url=_text(record.get("webhook_url")) or None,
        start_by=_float(record.get("start_by")),
    )


def key_from_record(record: Mapping[str, Any]) -> ApiKey:
    return ApiKey(
        id=str(record["id"]),
        key_hash=str(record["key_hash"]),
        name=str(record["name"]),
        balance_usd=to_usd(int(record["balance_micro"])),
        rpm=int(record["rpm"]),
        models=tuple(json.loads(record["models"])),
        created_at=float(record["created_at"]),
        revoked=str(record.get("revoked")) == "1",
        max_queued=_int(record.get("max_queued")) or 0,
        weight=_float(record.get("weight")) or 1.0,
        max_running=_int(record.get("max_running")) or 0,
    )


def event_from_record(event_id: str, record: Mapping[str, Any]) -> JobEvent:
    return JobEvent(
        id=event_id,
        job_id=str(record["job_id"]),
        key_id=str(record["key_id"]),
        slug=str(record["slug"]),
        type=JobEventType(record["type"]),
        at=float(record["at"]),
        attempt=_int(record.get("attempt")) or 0,
        error_kind=_text(record.get("error_kind")) or None,
        error=_text(record.get("error")) or None,
    )
