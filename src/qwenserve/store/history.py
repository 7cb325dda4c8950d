"""Request history and usage: what both stores keep of a request after its result expired.

A slim record per request (no output; the prompt only with ``HistoryPolicy.keep_prompts``) is
written in the submit's own atomic step and updated in the same step as each transition (the
event log's ``announce``), so it can never disagree with the job or the money: its
``cost_usd`` is what the key is charged for it now (a refunded failure: 0). It outlives the job
(``result_ttl_s``) and is purged ``HistoryPolicy.ttl_s`` after the request was made.

Pages are newest first, ordered by (created_at, request id), with an opaque cursor holding the
last record's pair, so records with equal timestamps are neither repeated nor skipped.
Usage is summed per UTC day (of submission), key and model.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

from qwenserve.catalog import GenerationRequest
from qwenserve.errors import InvalidRequest

DEFAULT_HISTORY_TTL_S = 30 * 24 * 3600.0
DAY_S = 86400
DEFAULT_USAGE_DAYS = 30
"""Usage reports cover this many days up to ``until`` unless told ``since``."""


@dataclass(frozen=True)
class HistoryPolicy:
    """How long history records are kept, and whether they keep the prompt."""

    ttl_s: float = DEFAULT_HISTORY_TTL_S
    keep_prompts: bool = False


@dataclass(frozen=True)
class HistoryRecord:
    """One request as history keeps it."""

    request_id: str
    key_id: str
    slug: str
    status: str
    created_at: float
    finished_at: float | None
    cost_usd: float
    inference_time_s: float | None
    error: str | None
    prompt: str | None = None


@dataclass(frozen=True)
class HistoryPage:
    records: list[HistoryRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class UsageRow:
    """One key's requests to one model on one UTC day."""

    day: str
    key_id: str
    model: str
    count: int
    cost_usd: float
    gpu_seconds: float


@dataclass(frozen=True)
class HistoryFilter:
    """Which records a page holds (None: any)."""

    status: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None

    def matches(self, record: HistoryRecord) -> bool:
        return (
            (self.status is None or record.status == self.status)
            and (self.model is None or record.slug == self.model)
            and (self.since is None or record.created_at >= self.since)
            and (self.until is None or record.created_at < self.until)
        )


def encode_cursor(created_at: float, request_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r} {request_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Raises InvalidRequest (naming ``cursor``) for anything ``encode_cursor`` did not make."""
    try:
        created, request_id = base64.urlsafe_b64decode(cursor.encode()).decode().split(" ", 1)
        return float(created), request_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("not a cursor this server gave out", field="cursor") from None


def day_number(at: float) -> int:
    return int(at // DAY_S)


def day_text(day: int) -> str:
    return datetime.fromtimestamp(day * DAY_S, UTC).strftime("%Y-%m-%d")


def prompt_of(request: GenerationRequest, policy: HistoryPolicy) -> str | None:
    """The prompt a history record keeps: ``request``'s, unless the policy keeps none."""
    return request.prompt if policy.keep_prompts else None


def parse_instant(value: str | None, field: str) -> float | None:
    """Unix seconds or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if value is None or not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"{field} must be Unix seconds or an ISO 8601 date/time", field=field
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
