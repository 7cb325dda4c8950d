"""Every variable in the README's configuration table reaches the part that uses it, under its
documented flat name, though the engine and worker knobs are grouped inside Settings."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwenserve.backends import history_policy
from qwenserve.cli.compose import engine_config
from qwenserve.config import EngineSettings, Settings, WorkerSettings
from qwenserve.runtime import EngineConfig
from qwenserve.worker.config import WorkerConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _engine(settings: Settings) -> EngineConfig:
    return engine_config(settings)


def _worker(settings: Settings) -> WorkerConfig:
    return WorkerConfig.from_settings(settings.worker, worker_id="w", max_batch=1)


# NAME: (what QWENSERVE_NAME is set to, where its consumer reads it, what it must read)
CASES: dict[str, tuple[str, Callable[[Settings], Any], Any]] = {
    "DATA_DIR": ("/srv/qs", lambda s: s.sqlite_path, Path("/srv/qs/qwenserve.db")),
    "STORE": ("redis://db:6379/2", lambda s: s.store, "redis://db:6379/2"),
    "HOST": ("0.0.0.0", lambda s: s.host, "0.0.0.0"),
    "PORT": ("9001", lambda s: s.port, 9001),
    "PUBLIC_URL": ("https://x.example", lambda s: s.public_url, "https://x.example"),
    "WORKERS": ("0", lambda s: s.workers, 0),
    "RESULT_TTL_S": ("60", lambda s: s.result_ttl_s, 60.0),
    "HISTORY_TTL_S": ("86400", lambda s: history_policy(s).ttl_s, 86400.0),
    "HISTORY_KEEP_PROMPTS": ("true", lambda s: history_policy(s).keep_prompts, True),
    "MAX_QUEUED": ("50", lambda s: s.max_queued, 50),
    "SYNC_TIMEOUT_S": ("5", lambda s: s.sync_timeout_s, 5.0),
    "CANCEL_ON_DISCONNECT": ("false", lambda s: s.cancel_on_disconnect, False),
    "EVENTS_POLL_S": ("1.5", lambda s: s.events_poll_s, 1.5),
    "WAIT_POLL_S": ("0.5", lambda s: s.wait_poll_s, 0.5),
    "WEIGHTS": ("hub", lambda s: _engine(s).weights, "hub"),
    "DEVICE": ("cpu", lambda s: _engine(s).device, "cpu"),
    "DTYPE": ("float16", lambda s: _engine(s).dtype, "float16"),
    "RESIDENT_MODELS": ("3", lambda s: _engine(s).resident_models, 3),
    "RESIDENT_MEMORY_GB": ("40", lambda s: _engine(s).resident_memory_gb, 40.0),
    "MEMORY_MARGIN_GB": ("3.5", lambda s: _engine(s).memory_margin_gb, 3.5),
    "PRELOAD": ('["qwen-image"]', lambda s: s.worker.preload, ["qwen-image"]),
    "FUSE_LIGHTNING": ("true", lambda s: _engine(s).fuse_lightning, True),
    "COMPILE": ("true", lambda s: _engine(s).compile, True),
    "QUANTIZE": ("fp8-speed", lambda s: _engine(s).quantize, "fp8-speed"),
    "VAE_TILING": ("false", lambda s: _engine(s).vae_tiling, False),
    "CPU_OFFLOAD": ("true", lambda s: _engine(s).cpu_offload, True),
    "STEP_CACHE": ("0.1", lambda s: _engine(s).step_cache, 0.1),
    "PROMPT_CACHE_SIZE": ("0", lambda s: _engine(s).prompt_cache_size, 0),
    "CFG_BATCH": ("true", lambda s: _engine(s).cfg_batch, True),
    "CACHE_DIR": ("/srv/cache", lambda s: _engine(s).cache_dir, Path("/srv/cache")),
    "MAX_BATCH": ("2", lambda s: s.worker.max_batch, 2),
    "BATCH_WINDOW_S": ("0.3", lambda s: _worker(s).batch_window_s, 0.3),
    "PREFETCH": ("false", lambda s: _worker(s).prefetch, False),
    "MEDIA_RETRY_S": ("5", lambda s: _worker(s).media_retry_s, 5.0),
    "ENGINE_PROCESS": ("false", lambda s: s.worker.engine_process, False),
    "MEDIA": ("s3://media/outputs", lambda s: s.media, "s3://media/outputs"),
    "MEDIA_URLS": ("presigned", lambda s: s.media_urls, "presigned"),
    "POLL_INTERVAL_S": ("2", lambda s: _worker(s).poll_interval_s, 2.0),
    "LEASE_S": ("7", lambda s: _worker(s).lease_s, 7.0),
    "MAX_ATTEMPTS": ("5", lambda s: _worker(s).max_attempts, 5),
    "DRAIN_TIMEOUT_S": ("9", lambda s: s.drain_timeout_s, 9.0),
    "ALLOW_PRIVATE_URLS": ("true", lambda s: s.allow_private_urls, True),
    "FETCH_TIMEOUT_S": ("3", lambda s: s.fetch_timeout_s, 3.0),
    "MAX_INPUT_BYTES": ("1000", lambda s: s.max_input_bytes, 1000),
    "MAX_INPUT_PIXELS": ("4000", lambda s: s.max_input_pixels, 4000),
    "MAX_LORA_BYTES": ("5000", lambda s: s.max_lora_bytes, 5000),
    "LOCAL_LORA_DIRS": ('["/srv/loras"]', lambda s: s.local_lora_dirs, [Path("/srv/loras")]),
    "PRICES_USD": ('{"qwen-image": 0.1}', lambda s: s.price_for("qwen-image", 1.0), 0.1),
    "CONTENT_POLICY": (
        "prompt+output",
        lambda s: (s.checks_outputs, s.checks_inputs),
        (True, False),
    ),
    "BLOCKED_TERMS_FILE": (
        "/srv/terms.txt",
        lambda s: s.blocked_terms_file,
        Path("/srv/terms.txt"),
    ),
    "NSFW_THRESHOLD": ("0.8", lambda s: s.nsfw_threshold, 0.8),
    "NSFW_CLASSIFIER": ("pkg.mod:make", lambda s: s.nsfw_classifier, "pkg.mod:make"),
    "CHARGE_BLOCKED_OUTPUTS": ("true", lambda s: s.charge_blocked_outputs, True),
    "LOG_BLOCKED_PROMPTS": ("true", lambda s: s.log_blocked_prompts, True),
    "REDIS_MIN_REPLICAS": ("1", lambda s: s.redis_min_replicas, 1),
    "REDIS_REPLICA_WAIT_S": ("0.5", lambda s: s.redis_replica_wait_s, 0.5),
}


def _documented_names() -> list[str]:
    """The first column of the README's configuration table: `NAME` or `NAME`, `NAME`."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([A-Z_]+)`", row.split("|")[1])]


def test_the_table_and_these_cases_name_the_same_variables() -> None:
    assert sorted(_documented_names()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_variable_reaches_its_consumer(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    value, read, expected = CASES[name]
    monkeypatch.setenv(f"QWENSERVE_{name}", value)
    assert read(Settings()) == expected
    monkeypatch.delenv(f"QWENSERVE_{name}")
    assert read(Settings()) != expected  # the variable, not a default, made the difference


def test_the_groups_hold_the_defaults_engine_and_worker_configs_use() -> None:
    """One place for each default: a bare EngineConfig / WorkerConfig is what a server with no
    settings builds (the worker's max_batch apart: its auto needs the device)."""
    engine = EngineConfig()
    for name, field in EngineSettings.model_fields.items():
        assert getattr(engine, name) == field.get_default(call_default_factory=True), name
    assert {f.name for f in dataclasses.fields(EngineConfig)} == {
        *EngineSettings.model_fields,
        "cache_dir",
    }
    worker = WorkerConfig(worker_id="w", max_batch=1)
    for name in (
        "lease_s",
        "max_attempts",
        "poll_interval_s",
        "batch_window_s",
        "prefetch",
        "media_retry_s",
    ):
        assert getattr(worker, name) == WorkerSettings.model_fields[name].default, name


def test_settings_and_keyword_overrides_keep_their_flat_names(tmp_path: Path) -> None:
    """The CLI passes options as flat keywords (``--weights`` is ``weights=``); the groups see
    them, and the flat fields stay readable."""
    settings = Settings(data_dir=tmp_path, weights="hub", lease_s=5, compile=True)
    assert (settings.engine.weights, settings.engine.compile) == ("hub", True)
    assert settings.worker.lease_s == 5.0
    assert isinstance(settings.engine, EngineSettings)
    assert isinstance(settings.worker, WorkerSettings)
