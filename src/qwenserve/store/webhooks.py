"""Webhook deliveries as the store keeps them: plain typed data and one record reader.

A delivery is made for a job that named a webhook URL when it ends (one per job ending, keyed by
the job id), by ``notify.webhooks.WebhookDispatcher``; the store keeps its state (pending,
delivered, failed), every attempt, when the next one is due, and the lease of the node sending
it, so a delivery survives restarts and is sent by one node at a time.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class WebhookAttempt:
    """One POST: when, and the answer's status code or the error that stopped it."""

    at: float
    status_code: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WebhookAttempt:
        code = data.get("status_code")
        return cls(
            at=float(data["at"]),
            status_code=int(code) if code is not None else None,
            error=str(data["error"]) if data.get("error") is not None else None,
        )


@dataclass(frozen=True)
class WebhookDelivery:
    """The delivery of one job's ending to its webhook URL."""

    job_id: str
    event_id: str
    """The ending's event id: the ``webhook-id`` of every attempt (receivers dedupe on it)."""
    key_id: str
    url: str
    status: DeliveryStatus
    created_at: float
    attempts: tuple[WebhookAttempt, ...] = ()
    next_attempt_at: float | None = None
    """When the next attempt is due (None once delivered or failed)."""
    body: str | None = None
    """The JSON sent, kept from the first attempt so every retry sends the same bytes."""

    def to_dict(self) -> dict[str, Any]:
        """The ``webhook`` field of a request's status and result bodies."""
        return {
            "url": self.url,
            "status": self.status.value,
            "attempts": [attempt.to_dict() for attempt in self.attempts],
            "next_retry_at": self.next_attempt_at
            if self.status is DeliveryStatus.PENDING and self.attempts
            else None,
        }


DELIVERY_FIELDS = (
    "job_id",
    "event_id",
    "key_id",
    "url",
    "status",
    "created_at",
    "attempts",
    "next_attempt_at",
    "body",
)


def delivery_from_record(record: Mapping[str, Any]) -> WebhookDelivery:
    """A SQLite row (as a dict) or a Redis hash → WebhookDelivery."""
    next_at = record.get("next_attempt_at")
    body = record.get("body")
    return WebhookDelivery(
        job_id=str(record["job_id"]),
        event_id=str(record["event_id"]),
        key_id=str(record["key_id"]),
        url=str(record["url"]),
        status=DeliveryStatus(record["status"]),
        created_at=float(record["created_at"]),
        attempts=tuple(
            WebhookAttempt.from_dict(item) for item in json.loads(record.get("attempts") or "[]")
        ),
        next_attempt_at=float(next_at) if next_at not in (None, "") else None,
        body=str(body) if body not in (None, "") else None,
    )
