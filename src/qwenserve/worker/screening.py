"""The content policy's image checks in the worker (``qwenserve.policy``): edit inputs once
they are loaded, before any compute; outputs after generation, before anything is stored
(``Finisher``). A block is a ``ContentPolicyViolation``, so the job ends FAILED as
``content_policy`` through the finisher's one ending path, refunded (outputs: unless the
operator charges them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwenserve.errors import ContentPolicyViolation
from qwenserve.policy import INPUT_BLOCKED
from qwenserve.policy.classifier import ImageCheck
from qwenserve.worker.inputs import CountsLoraCache, InputLoader

if TYPE_CHECKING:
    from PIL import Image

    from qwenserve.catalog import GenerationRequest


@dataclass(frozen=True)
class OutputScreen:
    """The check on generated images, and whether a blocked one is still charged."""

    check: ImageCheck
    charge: bool = False


class ScreenedInputLoader:
    """An ``InputLoader`` whose loaded images must pass ``check`` (the LoRA cache counts of
    the loader it wraps still reach /metrics)."""

    def __init__(self, inner: InputLoader, check: ImageCheck) -> None:
        self.inner = inner
        self.check = check

    def load_images(self, request: GenerationRequest) -> list[Image.Image]:
        """The request's images, loaded by the wrapped loader.

        Raises:
            ContentPolicyViolation: one of them is blocked (naming its field).
        """
        images = self.inner.load_images(request)
        for spec, image in zip(request.images, images, strict=True):
            # The request id is logged when the finisher fails the job.
            if self.check.blocks(image, what=f"input ({spec.field})"):
                raise ContentPolicyViolation(INPUT_BLOCKED, field=spec.field)
        return images

    def load_loras(self, request: GenerationRequest) -> list[Path]:
        return self.inner.load_loras(request)

    def lora_cache_counts(self) -> dict[str, int]:
        if isinstance(self.inner, CountsLoraCache):
            return self.inner.lora_cache_counts()
        return {}
