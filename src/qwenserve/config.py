"""Settings: the one place environment variables (``QWENSERVE_*``) are read.

Built once at the edge (the CLI) and passed down; nothing below reads the environment itself.
The engine's and the worker's knobs are groups (``EngineSettings``, ``WorkerSettings``) that
hold each default once; ``Settings.engine`` and ``Settings.worker`` hand them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path.home() / ".qwenserve"


class EngineSettings(BaseModel):
    """How the engine finds weights and runs them; ``runtime.EngineConfig`` is built from these
    (its defaults are these) plus the cache folder. Details of each switch: EngineConfig."""

    weights: str = Field(
        default="tiny",
        description="'tiny' (random CPU preset), 'hub' (Hugging Face ids via the HF cache) "
        "or a folder holding <org>/<name> weight folders.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    resident_models: int = Field(default=2, ge=1, description="Base pipelines kept loaded (LRU).")
    resident_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="Memory budget for resident pipelines; LRU evicts before a load to fit it "
        "(None: on CUDA, free memory less memory_margin_gb).",
    )
    memory_margin_gb: float = Field(
        default=8.0,
        ge=0,
        description="GiB of CUDA memory kept free of weights for activations and the VAE decode.",
    )
    # GPU fast paths (see qwenserve.runtime.config.EngineConfig for each switch's details)
    fuse_lightning: bool = Field(
        default=False, description="Fuse the Lightning LoRA for fast slugs."
    )
    compile: bool = Field(
        default=False,
        description="Regionally compile the transformer blocks; every variant warmed up at start.",
    )
    quantize: Literal["none", "fp8", "fp8-memory", "fp8-speed"] = Field(
        default="none",
        description="torchao float8: fp8-memory (alias fp8) weight-only, halves weight memory; "
        "fp8-speed float8 matmuls (CUDA capability 8.9+).",
    )
    vae_tiling: bool | None = Field(
        default=None, description="Tiled VAE decode (None: auto > 2 MP)."
    )
    cpu_offload: bool = Field(default=False, description="Model CPU offload for small GPUs (CUDA).")
    step_cache: float | None = Field(
        default=None, gt=0, description="First-block step-cache threshold (None: off)."
    )
    prompt_cache_size: int = Field(
        default=64, ge=0, description="Cached text-encoder outputs (0: off)."
    )
    cfg_batch: bool | None = Field(
        default=None,
        description="Run CFG's conditional and unconditional passes as one batch "
        "(None: on on a CPU, off on CUDA where it is unmeasured).",
    )


class WorkerSettings(BaseModel):
    """How a served worker claims, batches and holds jobs; ``worker.config.WorkerConfig`` takes
    its defaults from here."""

    lease_s: float = Field(default=60.0, gt=0, description="A claimed job is retaken after this.")
    max_attempts: int = Field(default=3, ge=1, description="Worker deaths before a job fails.")
    poll_interval_s: float = Field(
        default=0.5,
        gt=0,
        description="Idle worker polling period, a fallback: submits wake idle workers at once "
        "(in-process on SQLite, through Redis pub/sub across processes).",
    )
    max_batch: int | None = Field(
        default=None,
        ge=1,
        description="Most same-shape requests run in one pipeline call (1: off; None: 4 on a "
        "CPU, 1 on CUDA where batching is unmeasured).",
    )
    batch_window_s: float = Field(
        default=0.0, ge=0, description="Wait this long for batch-mates before a partial batch."
    )
    prefetch: bool = Field(
        default=True,
        description="While a batch runs, claim the next job and fetch/decode its inputs "
        "(never a job an idle peer serves).",
    )
    media_retry_s: float = Field(
        default=60.0,
        gt=0,
        description="How long a worker keeps retrying to store a finished image while the "
        "media store (an S3 bucket) is unreachable, the image kept; then the job fails, refunded.",
    )
    preload: list[str] = Field(
        default_factory=list,
        description="Slugs loaded and warmed up before the worker takes jobs.",
    )
    engine_process: bool = Field(
        default=True,
        description="Run each worker's engine (torch, the pipelines) in a child process, so a "
        "crash of model code (a segfault, the OOM killer) ends that process only: its jobs run "
        "again in a new one (False: a thread of this process, as tests and debuggers want).",
    )


class Settings(EngineSettings, WorkerSettings, BaseSettings):
    """Every knob of qwenserve. Each field is also ``QWENSERVE_<FIELD>`` in the environment.

    The engine and worker groups are inherited, not nested, so that each of their fields keeps
    its documented flat name (``QWENSERVE_COMPILE``, ``Settings(compile=True)``); read them
    through ``settings.engine`` and ``settings.worker``, which is what their consumers take.
    """

    # populate_by_name: fields read from a standard variable (AWS_REGION) keep their own name
    # in Settings(...) too.
    model_config = SettingsConfigDict(
        env_prefix="QWENSERVE_", extra="ignore", populate_by_name=True
    )

    # where things live
    data_dir: Path = Field(DEFAULT_DATA_DIR, description="Job store, media and caches.")
    cache_dir: Path | None = Field(
        None,
        description="Model caches (tiny preset, fetched LoRAs); default <data_dir>/cache.",
    )
    store: str = Field(
        "sqlite",
        description="'sqlite' (a file in the data dir), redis://HOST:PORT/DB for scale-out, or "
        "redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE/DB for a Sentinel-"
        "watched primary that fails over (parsed by qwenserve.backends.parse_store_url).",
    )
    redis_min_replicas: int = Field(
        0,
        ge=0,
        description="Redis replicas that must confirm a submit (WAIT) before it is answered 200, "
        "so an accepted job survives the primary's death; unconfirmed: 503, nothing charged.",
    )
    redis_replica_wait_s: float = Field(
        1.0, gt=0, description="How long a submit waits for those replicas (then 503)."
    )

    # serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    public_url: str | None = Field(
        None, description="Base URL clients reach us at behind a proxy (absolute URLs use it)."
    )
    workers: int = Field(1, ge=0, description="In-process workers (0: API only).")
    result_ttl_s: float = Field(3600.0, gt=0, description="Results and media kept this long.")
    sync_timeout_s: float = Field(600.0, gt=0, description="How long POST /v1 waits (then 504).")
    history_ttl_s: float = Field(
        30 * 24 * 3600.0,
        gt=0,
        description="Slim request records (GET /v2/requests, /v1/usage) kept this long after "
        "submission, results or not.",
    )
    history_keep_prompts: bool = Field(
        False, description="Keep each request's prompt in its history record."
    )
    wait_poll_s: float = Field(
        0.25,
        gt=0,
        description="POST /v1 waiters re-read the store this often, a fallback: a job's end wakes "
        "them at once (in-process; from worker processes through Redis pub/sub).",
    )
    cancel_on_disconnect: bool = Field(
        True,
        description="A POST /v1 caller that disconnects while waiting cancels its job (ended "
        "and refunded if it had not started; stopped at the next step if running).",
    )
    events_poll_s: float = Field(
        0.25,
        gt=0,
        le=5,
        description="How often a GET /v2/requests/{id}/events stream reads the store for news.",
    )
    event_poll_s: float = Field(
        0.2,
        gt=0,
        description="How often an API node or worker process reads the job event log (every "
        "ending, on any node, wakes its POST /v1 waiter; a cancel request stops the job's worker "
        "at its next step); on Redis the done and cancel channels also wake it at once.",
    )

    # media (where images live; media/s3.py, backends.py)
    media: str | None = Field(
        None,
        description="s3://BUCKET/PREFIX: images (outputs, inline inputs, previews) in an "
        "S3-compatible bucket, credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or any "
        "botocore source); unset: beside the store (the data dir's media folder on SQLite, "
        "Redis on redis://).",
    )
    media_urls: Literal["proxy", "presigned"] = Field(
        "proxy",
        description="How GET /media/{id} answers with S3 media: 'proxy' serves the bytes "
        "through the API; 'presigned' redirects (307) to a presigned bucket URL that expires "
        "with the result (the bucket's endpoint must be reachable by clients; needs media "
        "in S3, else the server refuses to start).",
    )
    media_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "QWENSERVE_MEDIA_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
        ),
        description="The S3-compatible server's URL (AWS_ENDPOINT_URL); unset: AWS itself.",
    )
    media_region: str | None = Field(
        None,
        validation_alias=AliasChoices("QWENSERVE_MEDIA_REGION", "AWS_REGION"),
        description="The bucket's region (AWS_REGION; unset: botocore's, else us-east-1).",
    )

    # inputs
    allow_private_urls: bool = Field(
        False, description="Let input URLs reach loopback/private/link-local addresses."
    )
    fetch_timeout_s: float = Field(20.0, gt=0)
    max_input_bytes: int = Field(25 * 1024 * 1024, gt=0)
    max_input_pixels: int = Field(40_000_000, gt=0)
    max_lora_bytes: int = Field(2 * 1024**3, gt=0)
    local_lora_dirs: list[Path] = Field(
        default_factory=list, description="Folders a lora_*_url may name a local file in."
    )

    # webhooks (notify/webhooks.py)
    webhook_timeout_s: float = Field(10.0, gt=0, description="The most one delivery attempt takes.")
    webhook_backoff_s: float = Field(
        5.0, gt=0, description="The first webhook retry's delay; doubled each time, jittered."
    )
    webhook_max_backoff_s: float = Field(3600.0, gt=0, description="The longest retry delay.")
    webhook_max_age_s: float = Field(
        86400.0, gt=0, description="Webhook retries stop this long after the job ended."
    )
    webhook_poll_s: float = Field(0.5, gt=0, description="How often due deliveries are sent.")

    # backpressure
    max_queued: int = Field(
        0,
        ge=0,
        description="The most jobs queued across the cluster (0: no limit); a submit past it is "
        "a 503 with Retry-After, and GET /readyz answers 503 while the queue is full.",
    )

    # accounts
    prices_usd: dict[str, float] = Field(
        default_factory=dict, description="Per-slug price overrides, e.g. {'qwen-image': 0.1}."
    )

    # content policy (qwenserve.policy)
    content_policy: Literal["off", "prompt", "prompt+output", "all"] = Field(
        "off",
        description="What the content policy checks: prompts (blocked terms), then also "
        "generated images (prompt+output), then also edit inputs (all).",
    )
    blocked_terms_file: Path | None = Field(
        None,
        description="Blocked terms, one a line ('#' comments, 're:' for a regular expression); "
        "an API node refuses to start without one whenever content_policy is not off.",
    )
    nsfw_threshold: float = Field(
        0.5, gt=0, le=1, description="Images the classifier scores at or above this are blocked."
    )
    nsfw_classifier: str = Field(
        "qwenserve.policy.nudenet:NudeNetClassifier",
        description="module:callable returning the image classifier (policy/classifier.py).",
    )
    charge_blocked_outputs: bool = Field(
        False, description="Charge a job whose output the policy blocked (default: refunded)."
    )
    log_blocked_prompts: bool = Field(
        False, description="Log the prompt text of a blocked request (default: only its id)."
    )

    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM: finish jobs this long.")
    purge_interval_s: float = Field(30.0, gt=0, description="How often expired results go.")
    log_level: str = "INFO"

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        # Parsed by the one parser (imported here: backends sits above config), so a bad URL
        # fails at startup with the forms it accepts.
        from qwenserve.backends import parse_store_url

        parse_store_url(value)
        return value

    @field_validator("media")
    @classmethod
    def _check_media(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        bucket = value.removeprefix("s3://").partition("/")[0]
        if not value.startswith("s3://") or not bucket:
            raise ValueError("media must be s3://BUCKET/PREFIX (or unset: beside the store)")
        return value

    @property
    def checks_outputs(self) -> bool:
        """The content policy classifies generated images."""
        return self.content_policy in ("prompt+output", "all")

    @property
    def checks_inputs(self) -> bool:
        """The content policy classifies the input images of edit slugs."""
        return self.content_policy == "all"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file of the embedded store (``backends.sqlite_file``)."""
        from qwenserve.backends import sqlite_file

        return sqlite_file(self)

    @property
    def engine(self) -> EngineSettings:
        """The engine group, what ``runtime.EngineConfig.from_settings`` takes."""
        return EngineSettings.model_construct(**_values(self, EngineSettings))

    @property
    def worker(self) -> WorkerSettings:
        """The worker group, what ``worker.config.WorkerConfig.from_settings`` takes."""
        return WorkerSettings.model_construct(**_values(self, WorkerSettings))

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    @property
    def model_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    def price_for(self, slug: str, default: float) -> float:
        return self.prices_usd.get(slug, default)


def _values(settings: Settings, group: type[BaseModel]) -> dict[str, Any]:
    # Already validated as Settings' own fields: copying them needs no second validation.
    return {name: getattr(settings, name) for name in group.model_fields}
