"""The engine's settings and its result: plain data, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from PIL import Image

from qwenserve.config import DEFAULT_DATA_DIR, EngineSettings
from qwenserve.errors import InferenceError

Quantize = Literal["none", "fp8", "fp8-memory", "fp8-speed"]
"""``EngineConfig.quantize`` values; "fp8" is an alias of "fp8-memory"."""
QuantizeMode = Literal["none", "fp8-memory", "fp8-speed"]

_DEFAULTS = EngineSettings()
"""Every default below is read from here: ``Settings`` (the engine group) holds each once."""


@dataclass(frozen=True)
class EngineConfig:
    """How an Engine finds weights and where it runs them.

    ``weights``: "tiny" (random weights built locally: images are noise), "hub" (Hugging Face ids
    through the HF cache) or a folder holding ``<org>/<name>`` pipelines and ``<repo>/<file>``
    LoRAs. ``cache_dir`` holds the tiny preset (``cache_dir/"tiny-v1"``). ``dtype`` "auto" is
    bfloat16 on CUDA and float32 elsewhere. At most ``resident_models`` base pipelines stay
    loaded, and only as many bytes as the memory budget allows, least recently used evicted
    before a load (``runtime/memory_plan.py``): ``resident_memory_gb`` when set, else on CUDA the
    free device memory (plus what the pipelines hold) less ``memory_margin_gb``.

    ``weights`` may also be "random-full": the real-size Qwen-Image transformer and VAE with
    random bf16 weights (a small text encoder projected to the real width), to measure real
    compute cost without the real checkpoints. It needs a CUDA GPU and refuses elsewhere.

    The fast-path switches below each default to the safe choice; see each field. Every default
    is ``EngineSettings``' (``qwenserve.config``), so a bare EngineConfig is what an unconfigured
    server runs.
    """

    weights: str = _DEFAULTS.weights
    cache_dir: Path = field(default_factory=lambda: DEFAULT_DATA_DIR / "cache")
    device: str = _DEFAULTS.device
    dtype: str = _DEFAULTS.dtype
    resident_models: int = _DEFAULTS.resident_models
    resident_memory_gb: float | None = _DEFAULTS.resident_memory_gb
    memory_margin_gb: float = _DEFAULTS.memory_margin_gb
    """GiB of CUDA memory kept free of resident weights, for the work itself: the
    transformer's activations (estimated ~3-5 GB for a batch of 4 at 1328² with CFG paired),
    cuBLAS workspaces and allocator fragmentation. A VAE decode that does not fit what is free
    less this margin is tiled. Ignored off CUDA and when ``resident_memory_gb`` is set (that
    budget is then taken as is for the weights; tiling still keeps the margin)."""
    fuse_lightning: bool = _DEFAULTS.fuse_lightning
    """True: slugs with a Lightning LoRA get their own resident pipeline with the
    LoRA fused into the transformer weights (no per-call adapter cost, no adapter switching),
    at the price of a second copy of the base weights while both kinds of slug are resident."""
    compile: bool = _DEFAULTS.compile
    """True: regional compilation of the transformer's repeated blocks with
    dynamic shapes (``runtime/compile.py``); ``Engine.load``/``Engine.warm_up`` compile every
    size, batch size and adapter set the slug can produce, and afterwards a variant they missed
    runs eagerly (counted) instead of compiling on a user request."""
    quantize: Quantize = _DEFAULTS.quantize
    """Float8 transformer through torchao (``pip install qwenserve[gpu]``):
    "fp8-memory" (alias "fp8"): weight-only, halves the transformer's weight memory, dequantizes
    in every matmul (not faster). "fp8-speed": dynamic float8 activations with per-row scales,
    float8 matmuls; needs CUDA compute capability 8.9+ (Ada, Hopper), refused elsewhere."""
    vae_tiling: bool | None = _DEFAULTS.vae_tiling
    """None: auto (on CUDA, tiled when the whole decode's estimated peak, batch x
    pixels, does not fit the free memory less ``memory_margin_gb``; elsewhere above 2 MP over
    batch x pixels; ``runtime/memory_plan.py``). True/False force it on/off. Tiling bounds the
    decoder's peak memory."""
    cpu_offload: bool = _DEFAULTS.cpu_offload
    """True: ``enable_model_cpu_offload`` (each component on the GPU only while
    it runs), for GPUs too small for the whole pipeline; needs CUDA, refused elsewhere."""
    step_cache: float | None = _DEFAULTS.step_cache
    """None: off. A float: diffusers' first-block cache with this relative threshold
    (e.g. 0.05): a step whose first block's residual barely changed reuses the rest of the
    transformer's last output. Faster, slightly different images. The threshold is relative to
    the residual's mean size; the random tiny preset changes it ~100% per step, so there only
    thresholds above 1 skip anything."""
    prompt_cache_size: int = _DEFAULTS.prompt_cache_size
    """Text-encoder outputs kept per (base weights, template, prompt), least
    recently used out; 0 turns the cache off. Text-to-image slugs only."""
    cfg_batch: bool | None = _DEFAULTS.cfg_batch
    """None: auto (on on a CPU, where it measured 1.18x per image; off on CUDA, where its
    gain is unmeasured and its padded text can cost flash attention). With true CFG on, the
    conditional and unconditional transformer passes of each step run as one batch
    (``runtime/cfg_batch.py``); same images up to float rounding. Text-to-image slugs with the
    prompt cache on; not combined with ``compile`` or ``step_cache``."""

    @classmethod
    def from_settings(cls, engine: EngineSettings, *, cache_dir: Path) -> EngineConfig:
        """The engine ``Settings.engine`` describes, its caches under ``cache_dir``."""
        return cls(cache_dir=cache_dir, **engine.model_dump())


def quantize_mode(quantize: str) -> QuantizeMode:
    """The mode a ``quantize`` value names ("fp8" is "fp8-memory"); InferenceError if unknown."""
    if quantize == "fp8":
        return "fp8-memory"
    if quantize in get_args(QuantizeMode):
        return quantize  # type: ignore[return-value]
    expected = ", ".join(get_args(Quantize))
    raise InferenceError(f"unknown quantize {quantize!r}; expected one of {expected}")


def resolve_cfg_batch(config: EngineConfig, device_type: str) -> bool:
    """``cfg_batch`` with auto (None) resolved: on on a CPU, off on a GPU until measured there."""
    if config.cfg_batch is not None:
        return config.cfg_batch
    return device_type == "cpu"


def default_max_batch(device_type: str) -> int:
    """Worker batching when ``max_batch`` is auto: 4 on a CPU (eight concurrent text-to-image
    requests measured 2.4-2.6x faster batched); 1 on a GPU, where at 1 MP and more one image
    already fills it and mixed prompt lengths force masked attention (unmeasured there)."""
    return 4 if device_type == "cpu" else 1


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image (RGB, exactly width x height) and how it was made."""

    image: Image.Image
    seed: int
    width: int
    height: int
    inference_time_s: float
