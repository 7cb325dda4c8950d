"""The tiny preset: the template drop counts, special tokens, and a stable on-disk layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from diffusers import QwenImagePipeline
from transformers import Qwen2Tokenizer

from qwenserve.catalog import PipelineKind
from qwenserve.runtime.tiny_preset import ensure_tiny_base, preset_root, prompt_templates
from qwenserve.runtime.tiny_tokenizer import IMAGE_PAD, VISION_END, VISION_START


def test_prefixes_tokenize_to_the_pipelines_drop_counts(shared_cache: Path) -> None:
    folder = ensure_tiny_base(shared_cache, "Qwen/Qwen-Image-Edit", PipelineKind.EDIT)
    tokenizer = Qwen2Tokenizer.from_pretrained(folder / "tokenizer")
    for template in prompt_templates():
        ids = tokenizer(template.template.format("zebra crossing"))["input_ids"]
        assert len(tokenizer(template.prefix)["input_ids"]) == template.drop_tokens
        kept = tokenizer.decode(ids[template.drop_tokens :])
        # Exactly the template prefix is dropped: what is kept starts where the user turn does.
        assert kept.startswith(("zebra crossing", f"{VISION_START}{IMAGE_PAD}{VISION_END}zebra"))


def test_text_encoder_uses_the_tokenizers_special_ids(shared_cache: Path) -> None:
    folder = ensure_tiny_base(shared_cache, "Qwen/Qwen-Image-Edit", PipelineKind.EDIT)
    tokenizer = Qwen2Tokenizer.from_pretrained(folder / "processor")
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert config["vision_start_token_id"] == tokenizer.convert_tokens_to_ids(VISION_START)
    assert config["vision_end_token_id"] == tokenizer.convert_tokens_to_ids(VISION_END)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right"


def test_saved_folder_has_the_stock_layout(shared_cache: Path) -> None:
    folder = ensure_tiny_base(shared_cache, "Qwen/Qwen-Image-Edit-2509", PipelineKind.EDIT_PLUS)
    assert folder == preset_root(shared_cache) / "Qwen" / "Qwen-Image-Edit-2509"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    # no leftovers of a build: staging folders are renamed into place
    assert not [p for p in folder.parent.iterdir() if ".building-" in p.name]


def test_two_processes_building_at_once_share_one_result(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from qwenserve.catalog import PipelineKind; "
        "from qwenserve.runtime.tiny_preset import ensure_tiny_base; "
        "print(ensure_tiny_base(Path(sys.argv[1]), 'Qwen/Qwen-Image', PipelineKind.TEXT_TO_IMAGE))"
    )
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [builder.communicate(timeout=120)[0].strip() for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0]
    folder = preset_root(tmp_path) / "Qwen" / "Qwen-Image"
    assert outputs == [str(folder), str(folder)]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["Qwen-Image"]  # no staging left
    pipe = QwenImagePipeline.from_pretrained(folder)
    assert pipe.transformer.config.num_layers == 2
