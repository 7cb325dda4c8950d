"""Build a weights folder laid out exactly like the published Hugging Face repos, tiny inside.

``build_hub_pipeline(root, "Qwen/Qwen-Image", kind)`` writes ``<root>/Qwen/Qwen-Image`` with
the published files: ``model_index.json`` with the published class names; ``scheduler/`` with
the published scheduler values; ``text_encoder/`` as transformers 4.5x wrote it (a flat
Qwen2.5-VL config with ``rope_scaling``, weights under the old ``model.layers.*``/``visual.*``
names, sharded as ``model-0000X-of-0000N.safetensors`` with an index); ``tokenizer/`` as
``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (no ``tokenizer.json``);
``transformer/`` sharded as ``diffusion_pytorch_model-0000X-of-0000N.safetensors`` with an
index; ``vae/``; and for the edit repos ``processor/`` with a flat ``preprocessor_config.json``.

The models are the tiny preset's (same seeds, so the same weights); only the files differ from
what ``save_pretrained`` writes today. Everything is built locally: nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qwenserve.catalog import PipelineKind
from qwenserve.runtime.schedulers import STOCK_SCHEDULER_CONFIG
from qwenserve.runtime.tiny_preset import build_tiny_pipeline

SHARD_SIZE = "100KB"
"""Small enough that every sharded component of the tiny models gets several shards."""

PUBLISHED_DIFFUSERS_VERSION = {"Qwen/Qwen-Image": "0.34.0.dev0"}
DEFAULT_DIFFUSERS_VERSION = "0.36.0.dev0"
PUBLISHED_TRANSFORMERS_VERSION = "4.53.1"

_CLASS_NAMES = {
    PipelineKind.TEXT_TO_IMAGE: "QwenImagePipeline",
    PipelineKind.EDIT: "QwenImageEditPipeline",
    PipelineKind.EDIT_PLUS: "QwenImageEditPlusPipeline",
}

# Qwen2.5-VL's image processor settings, as in the edit repos' processor/preprocessor_config.json
PUBLISHED_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# The keys of the published transformer and VAE configs (values come from the tiny models).
_TRANSFORMER_KEYS = (
    "attention_head_dim",
    "axes_dims_rope",
    "guidance_embeds",
    "in_channels",
    "joint_attention_dim",
    "num_attention_heads",
    "num_layers",
    "out_channels",
    "patch_size",
)
_VAE_KEYS = (
    "attn_scales",
    "base_dim",
    "dim_mult",
    "dropout",
    "latents_mean",
    "latents_std",
    "num_res_blocks",
    "temperal_downsample",
    "z_dim",
)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def _diffusers_config(folder: Path, keys: tuple[str, ...], version: str, **extra: Any) -> None:
    """Rewrite ``folder/config.json`` to the published key set (and published extras)."""
    saved = _read_json(folder / "config.json")
    config = {"_class_name": saved["_class_name"], "_diffusers_version": version}
    config.update({key: saved[key] for key in keys})
    config.update(extra)
    _write_json(folder / "config.json", dict(sorted(config.items())))


def _old_text_encoder_name(key: str) -> str:
    """transformers 5's parameter name → the name in the published (4.5x) checkpoint."""
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    return key


def _rename_shards(folder: Path, index_name: str, rename: Any) -> None:
    """Rename every tensor in the shards listed by ``index_name`` and in the index itself."""
    index_path = folder / index_name
    index = _read_json(index_path)
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(folder / shard))
        save_file({rename(k): v for k, v in tensors.items()}, str(folder / shard), {"format": "pt"})
    index["weight_map"] = {rename(k): v for k, v in sorted(index["weight_map"].items())}
    _write_json(index_path, index)


def _text_encoder(folder: Path, model: Any) -> None:
    model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    _rename_shards(folder, "model.safetensors.index.json", _old_text_encoder_name)
    saved = _read_json(folder / "config.json")
    text, vision = saved["text_config"], saved["vision_config"]
    rope = text["rope_parameters"]
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": text["attention_dropout"],
        "bos_token_id": text["bos_token_id"],
        "eos_token_id": text["eos_token_id"],
        "hidden_act": text["hidden_act"],
        "hidden_size": text["hidden_size"],
        "image_token_id": saved["image_token_id"],
        "initializer_range": text["initializer_range"],
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        "max_window_layers": text["num_hidden_layers"],
        "model_type": "qwen2_5_vl",
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "rms_norm_eps": text["rms_norm_eps"],
        "rope_scaling": {
            "mrope_section": rope["mrope_section"],
            "rope_type": "default",
            "type": "default",
        },
        "rope_theta": rope["rope_theta"],
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",  # the published files say bfloat16; these tensors are float32
        "transformers_version": PUBLISHED_TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": saved["video_token_id"],
        "vision_config": {
            "depth": vision["depth"],
            "fullatt_block_indexes": vision["fullatt_block_indexes"],
            "hidden_act": vision["hidden_act"],
            "hidden_size": vision["hidden_size"],
            "in_channels": 3,
            "in_chans": 3,
            "initializer_range": vision["initializer_range"],
            "intermediate_size": vision["intermediate_size"],
            "model_type": "qwen2_5_vl",
            "num_heads": vision["num_heads"],
            "out_hidden_size": vision["out_hidden_size"],
            "patch_size": vision["patch_size"],
            "spatial_merge_size": vision["spatial_merge_size"],
            "spatial_patch_size": vision["patch_size"],
            "temporal_patch_size": vision["temporal_patch_size"],
            "tokens_per_second": vision["tokens_per_second"],
            "torch_dtype": "float32",
            "window_size": vision["window_size"],
        },
        "vision_end_token_id": saved["vision_end_token_id"],
        "vision_start_token_id": saved["vision_start_token_id"],
        "vision_token_id": saved["vision_start_token_id"] + 2,  # <|vision_pad|> in Qwen's vocab
        "vocab_size": text["vocab_size"],
    }
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": text["bos_token_id"],
            "eos_token_id": text["eos_token_id"],
            "transformers_version": PUBLISHED_TRANSFORMERS_VERSION,
        },
    )


def _tokenizer_files(folder: Path, tokenizer: Any, *, with_tokenizer_json: bool) -> None:
    """The slow-tokenizer file set Qwen publishes: vocab.json, merges.txt, token maps."""
    staging = folder.with_name(folder.name + ".saved")
    tokenizer.save_pretrained(staging)
    saved = _read_json(staging / "tokenizer.json")
    model = saved["model"]
    added = {token["content"]: token for token in saved["added_tokens"]}
    vocab = {token: index for token, index in model["vocab"].items() if token not in added}
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model["merges"]]
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    _write_json(folder / "added_tokens.json", {name: t["id"] for name, t in added.items()})
    special = [name for name in added if name not in (tokenizer.eos_token, tokenizer.pad_token)]
    _write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": special,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
        },
    )
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(t["id"]): {
                    "content": name,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for name, t in added.items()
            },
            "additional_special_tokens": special,
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": tokenizer.eos_token,
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": tokenizer.pad_token,
            "padding_side": tokenizer.padding_side,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    if with_tokenizer_json:
        shutil.copy(staging / "tokenizer.json", folder / "tokenizer.json")
    shutil.rmtree(staging)


def build_hub_pipeline(root: Path, repo: str, kind: PipelineKind) -> Path:
    """``<root>/<repo>`` in the published layout, holding the tiny preset's ``repo`` models."""
    folder = root / repo
    if folder.exists():
        shutil.rmtree(folder)
    pipe = build_tiny_pipeline(kind, repo)
    version = PUBLISHED_DIFFUSERS_VERSION.get(repo, DEFAULT_DIFFUSERS_VERSION)

    pipe.transformer.save_pretrained(folder / "transformer", max_shard_size=SHARD_SIZE)
    # The published config carries a key today's class no longer takes.
    _diffusers_config(folder / "transformer", _TRANSFORMER_KEYS, version, pooled_projection_dim=768)
    pipe.vae.save_pretrained(folder / "vae")
    _diffusers_config(folder / "vae", _VAE_KEYS, version)
    _text_encoder(folder / "text_encoder", pipe.text_encoder)
    _tokenizer_files(folder / "tokenizer", pipe.tokenizer, with_tokenizer_json=False)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": version}
    scheduler.update(STOCK_SCHEDULER_CONFIG)
    _write_json(folder / "scheduler" / "scheduler_config.json", dict(sorted(scheduler.items())))

    index: dict[str, Any] = {
        "_class_name": _CLASS_NAMES[kind],
        "_diffusers_version": version,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    if kind is not PipelineKind.TEXT_TO_IMAGE:
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        processor = folder / "processor"
        _tokenizer_files(processor, pipe.tokenizer, with_tokenizer_json=True)
        _write_json(processor / "preprocessor_config.json", PUBLISHED_PREPROCESSOR)
        video = dict(PUBLISHED_PREPROCESSOR, video_processor_type="Qwen2VLVideoProcessor")
        del video["image_processor_type"]
        _write_json(processor / "video_preprocessor_config.json", video)
    _write_json(folder / "model_index.json", dict(sorted(index.items())))
    return folder


def published_shards(folder: Path, stem: str) -> list[str]:
    """The shard files of ``stem`` (``model`` or ``diffusion_pytorch_model``) in ``folder``."""
    pattern = re.compile(rf"^{re.escape(stem)}-(\d{{5}})-of-(\d{{5}})\.safetensors$")
    return sorted(p.name for p in folder.iterdir() if pattern.match(p.name))


def write_lightx2v_lora(diffusers_file: Path, path: Path) -> Path:
    """``diffusers_file`` (``transformer.*.lora_A/B``) rewritten in lightx2v's published key
    format: bare module names, ``lora_down``/``lora_up`` and an ``alpha`` equal to the rank."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in load_file(str(diffusers_file)).items():
        module, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        tensors[f"{module}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        if part.startswith("A"):
            tensors[f"{module}.alpha"] = torch.tensor(float(value.shape[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
