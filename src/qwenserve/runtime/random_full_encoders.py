"""Full-size text encoders with random weights: Qwen2.5-VL-7B (Qwen-Image) and Qwen3-VL-8B (2.1).

random-full's pipelines carry a two-layer encoder at the real width (real embedding shapes, a
fraction of the cost). The GPU proof also needs the real encoders: their memory (16.6 and 17.5 GB
in bf16, what sharing between bases saves), their encoding time and the edit path's vision tower
at its real size. Built here like the transformer: parameters on the meta device, storage and
random values straight on the target device, buffers as the constructor made them. The configs
are the published ones (``config.json`` of Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen3-VL-8B-
Instruct); the token ids stay the local tokenizer's.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import init_empty_weights

from qwenserve.catalog import PipelineKind
from qwenserve.runtime.random_full import _wide_text_encoder, materialise
from qwenserve.runtime.tiny_preset import _text_encoder, prompt_templates
from qwenserve.runtime.tiny_preset_21 import text_encoder_21
from qwenserve.runtime.tiny_tokenizer import build_tiny_tokenizer

QWEN25_VL_7B: dict[str, dict[str, Any]] = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}
QWEN3_VL_8B: dict[str, dict[str, Any]] = {
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    "vision_config": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 4096,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
}
ENCODER_NAMES = {
    PipelineKind.TEXT_TO_IMAGE: "Qwen2.5-VL-7B",
    PipelineKind.QWEN_IMAGE_21: "Qwen3-VL-8B",
}


def _small_encoder(kind: PipelineKind, tokenizer: Any, *, wide: bool) -> Any:
    if kind is PipelineKind.QWEN_IMAGE_21:
        from qwenserve.runtime.random_full_21 import wide_text_encoder_21

        return wide_text_encoder_21(tokenizer) if wide else text_encoder_21(tokenizer)
    return _wide_text_encoder(tokenizer) if wide else _text_encoder(tokenizer)


def random_text_encoder(
    kind: PipelineKind, device: torch.device, dtype: torch.dtype, *, full: bool = True
) -> Any:
    """The text encoder of ``kind`` (Qwen-Image's for every kind but 2.1) with random weights on
    ``device``: at its published size when ``full``, else the tiny preset's (a CPU dry run).

    The special-token ids, RoPE sections and patch sizes stay those of the local tokenizer and
    processor, so it drops into a random-full or tiny pipeline in place of its encoder."""
    tokenizer = build_tiny_tokenizer(prompt_templates())
    with init_empty_weights(include_buffers=False):
        small = _small_encoder(kind, tokenizer, wide=full)
    if not full:
        return materialise(small, device, dtype)
    sizes = QWEN3_VL_8B if kind is PipelineKind.QWEN_IMAGE_21 else QWEN25_VL_7B
    fields = small.config.to_dict()
    for part, values in sizes.items():
        fields[part] = {**fields[part], **values}
        fields[part].pop("layer_types", None)  # derived from the layer count: rebuilt
    config = type(small.config)(**fields)
    with init_empty_weights(include_buffers=False):
        module = type(small)(config)
    return materialise(module, device, dtype)
