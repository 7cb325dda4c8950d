"""A key's own request history (``GET /v2/requests``) and usage (``GET /v1/usage``).

Both read the store's slim history records (``store/history.py``), which outlive results: a
request whose result expired is still listed (its ``GET /v2/requests/{id}`` is a 404).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from qwenserve.api.auth import CurrentKey
from qwenserve.api.errors import error_responses
from qwenserve.api.schemas import HistoryPage as HistoryPageBody
from qwenserve.api.schemas import UsageBody
from qwenserve.api.services import Services
from qwenserve.errors import InvalidRequest
from qwenserve.jobs import JobStatus
from qwenserve.store.history import (
    DAY_S,
    DEFAULT_USAGE_DAYS,
    HistoryFilter,
    HistoryPage,
    UsageRow,
    parse_instant,
)

router = APIRouter(tags=["history"])


def record_body(record: Any) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "status": record.status,
        "model": record.slug,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "cost": record.cost_usd,
        "inference_time": record.inference_time_s,
        "error": record.error,
        **({"prompt": record.prompt} if record.prompt is not None else {}),
    }


@router.get(
    "/v2/requests",
    summary="The key's own requests, newest first (paginated with next_cursor)",
    response_model=HistoryPageBody,
    responses=error_responses(400, 401),
)
async def list_requests(
    request: Request,
    key: CurrentKey,
    status: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = Query(20),
    cursor: str | None = None,
) -> JSONResponse:
    services: Services = request.app.state.services
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be from 1 to 100", field="limit")
    if status is not None and status.upper() not in JobStatus.__members__:
        names = ", ".join(JobStatus.__members__)
        raise InvalidRequest(f"status must be one of {names}", field="status")
    where = HistoryFilter(
        status=status.upper() if status else None,
        model=model or None,
        since=parse_instant(since, "since"),
        until=parse_instant(until, "until"),
    )
    page: HistoryPage = await services.call(
        services.store.history, key.id, limit=limit, cursor=cursor or None, where=where
    )
    return JSONResponse(
        {"data": [record_body(r) for r in page.records], "next_cursor": page.next_cursor}
    )


def usage_body(rows: list[UsageRow]) -> dict[str, Any]:
    data = [
        {
            "day": r.day,
            "model": r.model,
            "count": r.count,
            "cost_usd": round(r.cost_usd, 6),
            "gpu_seconds": round(r.gpu_seconds, 4),
        }
        for r in rows
    ]
    total = {
        "count": sum(r.count for r in rows),
        "cost_usd": round(sum(r.cost_usd for r in rows), 6),
        "gpu_seconds": round(sum(r.gpu_seconds for r in rows), 4),
    }
    return {"data": data, "total": total}


@router.get(
    "/v1/usage",
    summary="The key's own usage per model per UTC day (default: the last 30 days)",
    response_model=UsageBody,
    responses=error_responses(400, 401),
)
async def usage(
    request: Request, key: CurrentKey, since: str | None = None, until: str | None = None
) -> JSONResponse:
    services: Services = request.app.state.services
    end = parse_instant(until, "until") or services.clock()
    start = parse_instant(since, "since") or end - DEFAULT_USAGE_DAYS * DAY_S
    rows: list[UsageRow] = await services.call(services.store.usage, key.id, since=start, until=end)
    return JSONResponse(usage_body(rows))
