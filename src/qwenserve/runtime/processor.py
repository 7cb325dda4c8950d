"""The edit pipelines' Qwen2-VL processor, loadable without torchvision.

In transformers 5.x the stock ``Qwen2VLProcessor`` cannot be built or loaded without a video
processor, and every video processor needs torchvision, which only exists as CUDA builds on the
registry (with the CPU torch it fails at import). The edit pipelines only ever pass images, so a
processor with the same behaviour minus video works everywhere; saved folders keep the stock
layout and class names, so they stay loadable by the stock class where torchvision exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

STOCK_PROCESSOR_CLASS = "Qwen2VLProcessor"


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only (no video processor, no torchvision)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


def load_processor(location: str, *, subfolder: str = "processor") -> ImageOnlyQwen2VLProcessor:
    """Load a pipeline's processor from ``location`` (a folder or a hub id) and its subfolder."""
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(location, subfolder=subfolder)
    tokenizer = Qwen2Tokenizer.from_pretrained(location, subfolder=subfolder)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def restore_stock_class_names(pipeline_folder: Path) -> None:
    """Make a saved folder name the stock processor class, as real checkpoints do."""
    index_path = pipeline_folder / "model_index.json"
    index = json.loads(index_path.read_text())
    if "processor" in index:
        index["processor"] = ["transformers", STOCK_PROCESSOR_CLASS]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = pipeline_folder / "processor" / name
        if not path.exists():
            continue
        config = json.loads(path.read_text())
        if config.get("processor_class") == ImageOnlyQwen2VLProcessor.__name__:
            config["processor_class"] = STOCK_PROCESSOR_CLASS
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
