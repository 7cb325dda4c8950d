"""The edit pipelines' Qwen2-VL processor (and Qwen-Image 2.1's Qwen3-VL one), loadable without
torchvision.

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

from transformers import Qwen2Tokenizer, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils.hub import cached_file

STOCK_PROCESSOR_CLASS = "Qwen2VLProcessor"
STOCK_PROCESSOR_CLASS_21 = "Qwen3VLProcessor"


class _WithoutVideo:
    """The processor's constructor with no video processor. Transformers reads a processor's
    parts from its ``__init__`` signature, so this one names only the image processor and the
    tokenizer."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


class ImageOnlyQwen2VLProcessor(_WithoutVideo, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only (no video processor, no torchvision)."""


class ImageOnlyQwen3VLProcessor(_WithoutVideo, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images and text only: Qwen-Image 2.1's processor without its
    video processor (no torchvision). The pipeline derives its template drop from the chat
    template, so that must come along."""


def load_processor_21(location: str, *, subfolder: str = "processor") -> ImageOnlyQwen3VLProcessor:
    """Qwen-Image 2.1's processor from ``location`` (a folder or a hub id): its image processor,
    tokenizer and chat template (the tokenizer reads ``chat_template.jinja``; an older
    ``chat_template.json`` is read here)."""
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(location, subfolder=subfolder)
    tokenizer = Qwen2Tokenizer.from_pretrained(location, subfolder=subfolder)
    template: str | None = getattr(tokenizer, "chat_template", None)
    if not template:
        path = cached_file(
            location,
            "chat_template.json",
            subfolder=subfolder,
            _raise_exceptions_for_missing_entries=False,
        )
        if path is not None:
            template = json.loads(Path(path).read_text())["chat_template"]
    return ImageOnlyQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
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
    stock = {
        ImageOnlyQwen2VLProcessor.__name__: STOCK_PROCESSOR_CLASS,
        ImageOnlyQwen3VLProcessor.__name__: STOCK_PROCESSOR_CLASS_21,
    }
    if "processor" in index:
        current = index["processor"][1]
        kept = current if current == STOCK_PROCESSOR_CLASS_21 else STOCK_PROCESSOR_CLASS
        index["processor"] = ["transformers", stock.get(current, kept)]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = pipeline_folder / "processor" / name
        if not path.exists():
            continue
        config = json.loads(path.read_text())
        if config.get("processor_class") in stock:
            config["processor_class"] = stock[config["processor_class"]]
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
