"""Where base pipelines and LoRA files come from: the tiny preset, the hub, or a folder.

All three end in the same ``from_pretrained(location)`` and ``load_lora_weights(file)`` calls:
the tiny preset is itself a folder laid out like a weights folder (``<org>/<name>`` per base,
``<repo>/<filename>`` per LoRA), built on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qwenserve.catalog import LoraSource, PipelineKind
from qwenserve.errors import InferenceError


class WeightSource(Protocol):
    """Resolves base weights ids and LoRA sources to something diffusers can load."""

    def base_location(self, base_weights: str, kind: PipelineKind) -> str:
        """A folder path or hub id for ``from_pretrained``."""
        ...

    def lora_file(self, source: LoraSource, base_weights: str, kind: PipelineKind) -> Path:
        """A local safetensors file holding ``source``."""
        ...


@dataclass(frozen=True)
class FolderWeights:
    """A folder holding ``<org>/<name>`` diffusers folders and ``<repo>/<filename>`` LoRAs."""

    root: Path

    def base_location(self, base_weights: str, kind: PipelineKind) -> str:
        folder = self.root / base_weights
        if not (folder / "model_index.json").is_file():
            raise InferenceError(
                f"weights folder {self.root} has no {base_weights} pipeline "
                f"(expected {folder / 'model_index.json'})"
            )
        return str(folder)

    def lora_file(self, source: LoraSource, base_weights: str, kind: PipelineKind) -> Path:
        path = self.root / source.repo / source.filename
        if not path.is_file():
            raise InferenceError(
                f"weights folder {self.root} has no LoRA {source.repo}/{source.filename} "
                f"(expected {path})"
            )
        return path


@dataclass(frozen=True)
class TinyWeights:
    """The random-weights preset, built on first use under ``<cache_dir>/tiny-v1``."""

    cache_dir: Path

    def base_location(self, base_weights: str, kind: PipelineKind) -> str:
        from qwenserve.runtime.tiny_preset import ensure_tiny_base

        return str(ensure_tiny_base(self.cache_dir, base_weights, kind))

    def lora_file(self, source: LoraSource, base_weights: str, kind: PipelineKind) -> Path:
        from qwenserve.runtime.tiny_preset import ensure_tiny_lora

        return ensure_tiny_lora(self.cache_dir, source, base_weights, kind)


@dataclass(frozen=True)
class RandomFullWeights:
    """Real-size random weights (``random_full``); LoRAs are random files of the real shape."""

    cache_dir: Path

    def base_location(self, base_weights: str, kind: PipelineKind) -> str:
        return f"random-full:{base_weights}"

    def lora_file(self, source: LoraSource, base_weights: str, kind: PipelineKind) -> Path:
        from qwenserve.runtime.random_full import ensure_random_full_lora

        return ensure_random_full_lora(self.cache_dir, source, kind)


@dataclass(frozen=True)
class HubWeights:
    """Hugging Face hub ids, through the local HF cache (downloads where the network allows)."""

    def base_location(self, base_weights: str, kind: PipelineKind) -> str:
        from qwenserve.runtime.hub_access import require_hub_repo

        require_hub_repo(base_weights)  # a clear error now instead of a long network wait
        return base_weights

    def lora_file(self, source: LoraSource, base_weights: str, kind: PipelineKind) -> Path:
        from huggingface_hub import hf_hub_download

        from qwenserve.runtime.hub_access import require_hub_repo

        require_hub_repo(source.repo, source.filename)
        try:
            return Path(hf_hub_download(source.repo, source.filename))
        except Exception as error:  # network, auth, missing file: all an engine failure here
            raise InferenceError(
                f"could not fetch LoRA {source.repo}/{source.filename}: {error}"
            ) from error


def describe_weights(weights: str) -> str:
    """``EngineConfig.weights`` in words; says plainly when images are noise."""
    if weights == "tiny":
        return "tiny preset (random weights: images are noise)"
    if weights == "hub":
        return "weights from the Hugging Face hub"
    if weights == "random-full":
        return "random-full preset (real-size transformer, random weights: images are noise)"
    return f"weights from folder {weights}"


def weight_source(weights: str, cache_dir: Path) -> WeightSource:
    """``"tiny"``, ``"hub"``, ``"random-full"`` or a folder path (``EngineConfig.weights``)."""
    if weights == "tiny":
        return TinyWeights(cache_dir)
    if weights == "hub":
        return HubWeights()
    if weights == "random-full":
        return RandomFullWeights(cache_dir)
    root = Path(weights).expanduser()
    if not root.is_dir():
        raise InferenceError(f"weights folder {root} does not exist")
    return FolderWeights(root)
