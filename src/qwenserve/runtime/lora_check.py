"""Reading a LoRA file for a transformer, and refusing it unless every key fits.

diffusers keeps only the keys under ``transformer.`` (so an unprefixed file, as many trainers
write, loads nothing) and merely logs keys that match no module (so a LoRA for another model
half-loads and silently changes the image). Here every key is checked against the actual
transformer before anything is loaded: its target module must exist and be a linear layer, and
``lora_A``/``lora_B`` must have that layer's in/out features and one rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwenserve.errors import InvalidInput

PREFIX = "transformer."
_WRAPPERS = (PREFIX, "base_model.model.", "diffusion_model.")
_PARTS = ((".lora_down.weight", ".lora_A.weight"), (".lora_up.weight", ".lora_B.weight"))
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class LoraWeights:
    """A checked LoRA: state dict with ``transformer.`` keys, and diffusers' adapter metadata."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None


def _diffusers_key(key: str) -> str:
    """``key`` as ``transformer.<module>.lora_A|B.weight``, whatever wrapper wrote it.

    diffusers converts the published formats only when it spots one of their marks (``.alpha``,
    ``lora_unet_``, ``diffusion_model.``, ``.default.``): a lightx2v-style file without alphas
    keeps its ``lora_down``/``lora_up`` names, a trainer's ``transformer.``-prefixed file with
    alphas comes back prefixed twice, and peft's raw ``base_model.model.`` prefix is never
    removed. Each of those is the same LoRA (no alpha means scale 1), so it is renamed here.
    """
    stripped = True
    while stripped:
        stripped = False
        for wrapper in _WRAPPERS:
            if key.startswith(wrapper):
                key, stripped = key[len(wrapper) :], True
    for old, new in _PARTS:
        if key.endswith(old):
            key = key[: -len(old)] + new
    return PREFIX + key


def _reason(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer, looking through a peft wrapper."""
    get_base = getattr(module, "get_base_layer", None)
    base = get_base() if callable(get_base) else module
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    return None


def read_lora(
    pipe: Any, path: Path, transformer: torch.nn.Module, *, field: str, model: str
) -> LoraWeights:
    """The LoRA in ``path`` for ``transformer``, keys prefixed, every key checked.

    Raises InvalidInput(field) when the file cannot be read, holds no LoRA weights, has keys
    for modules the transformer lacks, or shapes that do not fit.
    """
    try:
        state, metadata = pipe.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as error:
        raise InvalidInput(
            f"{field}: not a LoRA for {model}: {_reason(error)}", field=field
        ) from error
    if not state:
        raise InvalidInput(f"{field}: the file holds no tensors", field=field)
    state = {_diffusers_key(key): value for key, value in state.items()}
    if metadata and not any(key.startswith(PREFIX) for key in metadata):
        metadata = {PREFIX + key: value for key, value in metadata.items()}
    modules = dict(transformer.named_modules())
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key.removeprefix(PREFIX))
        if match is None:
            raise InvalidInput(
                f"{field}: not a LoRA for {model}: unexpected key {key!r}", field=field
            )
        name, part, kind = match["module"], match["part"], match["kind"]
        features = _features(modules[name]) if name in modules else None
        if features is None:
            raise InvalidInput(
                f"{field}: not a LoRA for {model}: it targets {name!r}, "
                "which is not a linear layer of this model",
                field=field,
            )
        in_features, out_features = features
        if kind == "bias":
            if part != "B" or tuple(tensor.shape) != (out_features,):
                raise InvalidInput(
                    f"{field}: not a LoRA for {model}: {key} has shape {tuple(tensor.shape)}",
                    field=field,
                )
            continue
        expected_features = in_features if part == "A" else out_features
        rank = tensor.shape[0] if part == "A" else tensor.shape[-1]
        actual_features = tensor.shape[-1] if part == "A" else tensor.shape[0]
        if tensor.ndim != 2 or actual_features != expected_features:
            raise InvalidInput(
                f"{field}: not a LoRA for {model}: {key} has shape {tuple(tensor.shape)}, "
                f"the layer has {in_features} in / {out_features} out features",
                field=field,
            )
        ranks.setdefault(name, {})[part] = rank
    for name, parts in ranks.items():
        if set(parts) != {"A", "B"} or parts["A"] != parts["B"]:
            raise InvalidInput(
                f"{field}: not a LoRA for {model}: {name} needs lora_A and lora_B of one rank",
                field=field,
            )
    return LoraWeights(state_dict=state, metadata=metadata)
