"""LoRA files in the key formats people publish for the Qwen-Image transformer.

Each file is written the way its tool writes it, with the real module names (the tiny preset's
transformer has them, only small), and reaches the engine the way a ``lora_2_url`` naming a
local file does: through the LoraFetcher's checks, then ``generate(extra_loras=...)``. Every
format encodes the same LoRA (alpha = rank / 2 where a format has alphas, pre-scaled where it
has none), so each must give exactly the image the diffusers/peft file gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwenserve.catalog import GenerationRequest, LoraRef, PipelineKind
from qwenserve.errors import InvalidInput
from qwenserve.media.fetch import UrlFetcher
from qwenserve.media.lora import LoraFetcher
from qwenserve.runtime import Engine
from qwenserve.runtime.tiny_preset import LORA_RANK, ensure_tiny_base, tiny_lora_state_dict
from tests.runtime.conftest import make_request, pixels

Tensors = dict[str, torch.Tensor]
Writer = Callable[[str, torch.Tensor, torch.Tensor], Tensors]
"""(module name, lora_A, lora_B) → the tensors one tool writes for that module."""

ALPHA = LORA_RANK / 2  # scale alpha / rank = 0.5: a loader that ignores alphas is caught

# Every kind of linear layer in a Qwen-Image block, as published LoRAs (Lightning included)
# target them: joint attention on both streams, both MLPs, both modulations.
MODULE_KINDS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
    "txt_mod.1",
)


def _alpha() -> torch.Tensor:
    return torch.tensor(ALPHA)  # a fresh scalar per key: safetensors refuses shared storage


def _kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _halved(down: torch.Tensor) -> torch.Tensor:
    return (down * 0.5).contiguous()


FORMATS: dict[str, Writer] = {
    # diffusers' own save_lora_weights / peft trainers: the reference
    "diffusers": lambda m, a, b: {
        f"transformer.{m}.lora_A.weight": _halved(a),
        f"transformer.{m}.lora_B.weight": b,
    },
    # lightx2v (Qwen-Image-Lightning): bare module names, lora_down / lora_up / alpha
    "lightx2v": lambda m, a, b: {
        f"{m}.lora_down.weight": a,
        f"{m}.lora_up.weight": b,
        f"{m}.alpha": _alpha(),
    },
    "lightx2v-bf16": lambda m, a, b: {
        f"{m}.lora_down.weight": a.to(torch.bfloat16),
        f"{m}.lora_up.weight": b.to(torch.bfloat16),
        f"{m}.alpha": _alpha().to(torch.bfloat16),
    },
    "lightx2v-no-alpha": lambda m, a, b: {
        f"{m}.lora_down.weight": _halved(a),
        f"{m}.lora_up.weight": b,
    },
    # trainers that keep the component prefix and write alphas (OneTrainer style)
    "prefixed-down-up-alpha": lambda m, a, b: {
        f"transformer.{m}.lora_down.weight": a,
        f"transformer.{m}.lora_up.weight": b,
        f"transformer.{m}.alpha": _alpha(),
    },
    "peft-with-alpha": lambda m, a, b: {
        f"transformer.{m}.lora_A.weight": a,
        f"transformer.{m}.lora_B.weight": b,
        f"transformer.{m}.alpha": _alpha(),
    },
    # peft's get_peft_model_state_dict, saved as is
    "peft-raw": lambda m, a, b: {
        f"base_model.model.{m}.lora_A.weight": _halved(a),
        f"base_model.model.{m}.lora_B.weight": b,
    },
    # DiffSynth-Studio: peft names with the adapter name left in
    "diffsynth": lambda m, a, b: {
        f"{m}.lora_A.default.weight": _halved(a),
        f"{m}.lora_B.default.weight": b,
    },
    # ComfyUI / ai-toolkit: diffusion_model.* in both naming styles
    "comfyui": lambda m, a, b: {
        f"diffusion_model.{m}.lora_A.weight": _halved(a),
        f"diffusion_model.{m}.lora_B.weight": b,
    },
    "comfyui-down-up-alpha": lambda m, a, b: {
        f"diffusion_model.{m}.lora_down.weight": a,
        f"diffusion_model.{m}.lora_up.weight": b,
        f"diffusion_model.{m}.alpha": _alpha(),
    },
    # kohya / musubi-tuner: flattened names
    "kohya": lambda m, a, b: {
        f"{_kohya_name(m)}.lora_down.weight": a,
        f"{_kohya_name(m)}.lora_up.weight": b,
        f"{_kohya_name(m)}.alpha": _alpha(),
    },
}


@dataclasses.dataclass(frozen=True)
class Reference:
    """One LoRA (module → lora_A, lora_B) and what it and the bare model draw."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base: np.ndarray[Any, Any]
    styled: np.ndarray[Any, Any]


def _request() -> GenerationRequest:
    request = make_request("qwen-image-fast", prompt="a teapot", steps=2, seed=44)
    return dataclasses.replace(
        request, extra_loras=(LoraRef(field="lora_2_url", location="mine.safetensors"),)
    )


def _write(folder: Path, name: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    tensors: Tensors = {}
    for module, (down, up) in modules.items():
        tensors.update(FORMATS[name](module, down, up))
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-loras")


@pytest.fixture(scope="module")
def fetcher(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> LoraFetcher:
    """How a server with local LoRA folders enabled turns ``lora_2_url`` into a file."""
    return LoraFetcher(
        tmp_path_factory.mktemp("lora-cache"),
        fetcher=UrlFetcher(),
        max_bytes=2**20,
        local_dirs=[folder],
    )


@pytest.fixture(scope="module")
def reference(engine: Engine, shared_cache: Path, folder: Path) -> Reference:
    base_folder = ensure_tiny_base(shared_cache, "Qwen/Qwen-Image", PipelineKind.TEXT_TO_IMAGE)
    state = tiny_lora_state_dict(base_folder, "a published LoRA")
    modules = {
        key.removeprefix("transformer.").removesuffix(".lora_A.weight"): (
            value,
            state[key.replace("lora_A", "lora_B")],
        )
        for key, value in state.items()
        if key.endswith("lora_A.weight")
    }
    request = _request()
    base = pixels(engine.generate(dataclasses.replace(request, extra_loras=())).image)
    path = _write(folder, "diffusers", modules)
    styled = pixels(engine.generate(request, extra_loras=[path]).image)
    return Reference(modules=modules, base=base, styled=styled)


def test_the_reference_lora_touches_every_module_kind(reference: Reference) -> None:
    kinds = {name.split(".", 2)[2] for name in reference.modules}
    assert kinds == set(MODULE_KINDS)
    assert np.abs(reference.styled - reference.base).mean() > 1.0


@pytest.mark.parametrize("name", sorted(set(FORMATS) - {"diffusers"}))
def test_published_format_loads_as_the_same_lora(
    engine: Engine, reference: Reference, folder: Path, fetcher: LoraFetcher, name: str
) -> None:
    path = fetcher.resolve(_write(folder, name, reference.modules).name, field="lora_2_url")
    request = _request()
    styled = pixels(engine.generate(request, extra_loras=[path]).image)
    after = pixels(engine.generate(dataclasses.replace(request, extra_loras=())).image)
    if name == "lightx2v-bf16":
        # bf16 weights round the LoRA: the same picture, not the same bits
        assert np.abs(styled - reference.styled).mean() < 1.0
    else:
        assert np.array_equal(styled, reference.styled)
    assert np.array_equal(after, reference.base), "the LoRA leaked into the next job"


@pytest.mark.parametrize("kind", MODULE_KINDS)
def test_each_module_kind_changes_the_image_in_kohya_names(
    engine: Engine, reference: Reference, tmp_path: Path, kind: str
) -> None:
    # kohya flattens dots to underscores; every kind must map back to its real module.
    only = {name: pair for name, pair in reference.modules.items() if name.endswith(kind)}
    tensors: Tensors = {}
    for module, (down, up) in only.items():
        tensors.update(FORMATS["kohya"](module, down * 4, up))
    path = tmp_path / "one-kind.safetensors"
    save_file(tensors, str(path))
    styled = pixels(engine.generate(_request(), extra_loras=[path]).image)
    # Some kinds reach the image only through the other stream, so any change counts.
    assert not np.array_equal(styled, reference.base), f"a LoRA on {kind} changed nothing"


def _foreign(keys: dict[str, tuple[int, ...]]) -> Tensors:
    return {key: torch.zeros(shape) for key, shape in keys.items()}


@pytest.mark.parametrize(
    "tensors",
    [
        # kohya, for FLUX.1
        _foreign(
            {
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 32),
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (96, 4),
                "lora_unet_double_blocks_0_img_attn_qkv.alpha": (),
            }
        ),
        # kohya, text encoder only (SDXL)
        _foreign(
            {
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 32),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (32, 4),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": (),
            }
        ),
        # ComfyUI, for FLUX.1
        _foreign(
            {
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (4, 32),
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (96, 4),
            }
        ),
        # lightx2v, for Wan 2.1
        _foreign(
            {
                "blocks.0.self_attn.q.lora_down.weight": (4, 32),
                "blocks.0.self_attn.q.lora_up.weight": (32, 4),
                "blocks.0.self_attn.q.alpha": (),
            }
        ),
    ],
    ids=["kohya-flux", "kohya-text-encoder", "comfyui-flux", "lightx2v-wan"],
)
def test_a_lora_for_another_model_is_refused_naming_its_field(
    engine: Engine, reference: Reference, tmp_path: Path, tensors: Tensors
) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file(tensors, str(path))
    request = _request()
    with pytest.raises(InvalidInput, match="lora_2_url") as caught:
        engine.generate(request, extra_loras=[path])
    assert caught.value.field == "lora_2_url"
    after = pixels(engine.generate(dataclasses.replace(request, extra_loras=())).image)
    assert np.array_equal(after, reference.base)
