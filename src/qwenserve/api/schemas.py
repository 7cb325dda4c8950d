"""What each route's success answer looks like, for ``/openapi.json`` (and so /docs, /redoc and
generated clients): pydantic models of the bodies the handlers build as dicts.

Declarations only. The handlers return their own ``Response`` objects, which FastAPI sends as
they are (``response_model`` neither filters nor validates them), so no wire body depends on
these models; the OpenAPI fuzz test (tests/service/test_openapi_fuzz.py) checks the real answers
against them. Fields that only some answers carry (live fields, ``error``, ``webhook``) are
optional here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatusName = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]

BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_CONTENT: dict[str, Any] = {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY}
EVENT_STREAM: dict[str, Any] = {
    "text/event-stream": {
        "schema": {"type": "string", "description": "Server-Sent Events (`event:`, `id:`, `data:`)"}
    }
}


class _Body(BaseModel):
    # Additive fields (qwenserve's or a later version's) are allowed: clients ignore them.
    model_config = ConfigDict(extra="allow")


class SubmitBody(_Body):
    """``POST /v2/{slug}``: where to follow the queued request."""

    request_id: str
    status: Literal["QUEUED", "FAILED"] = Field(
        description="FAILED only when the content policy refused it at submit"
    )
    status_url: str
    response_url: str
    poll_url: str = Field(description="The same as `status_url`")


class JobMetrics(_Body):
    cost: float = Field(description="USD charged (0 once refunded)")
    queue_time: float | None = Field(None, description="Seconds from submit to a worker's claim")
    inference_time: float | None = Field(None, description="Seconds of generation (COMPLETED)")


class ProgressBody(_Body):
    step: int
    total_steps: int
    fraction: float


class WebhookAttempt(_Body):
    at: float
    status_code: int | None = None
    error: str | None = None


class WebhookState(_Body):
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: list[WebhookAttempt]
    next_retry_at: float | None


class _LiveFields(_Body):
    error: str | None = Field(None, description="FAILED only: why")
    queue_position: int | None = Field(
        None, description="QUEUED only: jobs of its model taken before it (fair order; 0: next)"
    )
    eta_s: float | None = Field(None, description="Unfinished only: estimated seconds left")
    progress: ProgressBody | None = Field(None, description="PROCESSING, denoising only")
    waiting: bool | None = Field(None, description="PROCESSING, not yet denoising only")
    cancel_requested: bool | None = Field(None, description="While a cancel is pending")
    webhook: WebhookState | None = Field(None, description="When the request named a webhook")


class StatusBody(_LiveFields):
    """``GET /v2/requests/{id}/status`` (and a cancel's answer)."""

    status: JobStatusName
    request_id: str
    status_url: str
    response_url: str
    metrics: JobMetrics


class ResultBody(_LiveFields):
    """``GET /v2/requests/{id}``: the output once COMPLETED."""

    status: JobStatusName
    request_id: str
    model: str
    output: str | None = Field(description="The image's URL (`/media/…`), or base64 with `base64`")
    metrics: JobMetrics
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    content_type: str | None = None


class SyncBase64Body(_Body):
    """``POST /v1/{slug}`` with ``base64`` (``base_64``) true."""

    image: str = Field(description="The image, base64")
    status: Literal["Success"]
    request_id: str
    seed: int
    width: int
    height: int
    content_type: str
    inference_time: float


class CreditsBody(_Body):
    credits: float = Field(description="The key's balance, USD")
    free_credits: float = Field(alias="free-credits")


class ModelEntry(_Body):
    id: str = Field(description="The slug")
    object: Literal["model"]
    created: int
    owned_by: str
    kind: str = Field(description="`text-to-image`, `edit` or `text-to-image+edit`")
    title: str
    description: str
    price_usd: float
    max_input_images: int
    weights: str = Field(description="The Hugging Face repo id of the checkpoint it runs")
    distillation_lora: str | None = Field(
        description="`repo/filename` of the distillation LoRA it adds, or null"
    )


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelEntry]


class ModelCard(ModelEntry):
    input_schema: dict[str, Any] = Field(description="The request body's JSON Schema")


class HistoryRecord(_Body):
    request_id: str
    status: JobStatusName
    model: str
    created_at: float
    finished_at: float | None
    cost: float
    inference_time: float | None
    error: str | None
    prompt: str | None = Field(None, description="Only with HISTORY_KEEP_PROMPTS")


class HistoryPage(_Body):
    data: list[HistoryRecord]
    next_cursor: str | None = Field(description="Pass back as `cursor`; null on the last page")


class UsageTotal(_Body):
    count: int
    cost_usd: float
    gpu_seconds: float


class UsageRowBody(UsageTotal):
    day: str = Field(description="UTC day of submission, YYYY-MM-DD")
    model: str


class UsageBody(_Body):
    data: list[UsageRowBody]
    total: UsageTotal


class HealthBody(_Body):
    status: Literal["ok"]
    queued: int
    processing: int
    workers: int


class ServerInfoBody(_Body):
    name: Literal["qwenserve"]
    version: str
    weights: Literal["tiny", "hub", "folder", "random-full"]
    random_weights: bool


class ImageItem(_Body):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesBody(_Body):
    """OpenAI's images response (without ``stream``)."""

    created: int
    data: list[ImageItem]
    output_format: str | None = None
    size: str | None = None
    background: str | None = None
    quality: str | None = None
