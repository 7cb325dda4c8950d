"""What the worker needs of the engine: ``qwenserve.runtime.Engine`` is one, test fixtures are
others. Typing only; the worker never imports torch."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from qwenserve.catalog import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image

    from qwenserve.runtime.config import GeneratedImage

StepCallback = Callable[[int, int], None]
"""Called by the engine after each denoising step with (steps done, total steps)."""
CancelCheck = Callable[[], bool]
"""Asked by the engine after each denoising step: True stops the call ("cancelled")."""
PreviewCallback = Callable[[int, int, "Image.Image"], None]
"""Called by the engine with (the request's index in the call, the preview's index, the
image) for each preview a request's ``partial_images`` asks for. Passed only when one does,
so an engine that makes no previews need not take it."""


class ImageEngine(Protocol):
    """Generates images for validated requests, one or a batch per pipeline call."""

    def generate(
        self,
        request: GenerationRequest,
        *,
        images: Sequence[Image.Image] = (),
        extra_loras: Sequence[Path] = (),
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> GeneratedImage: ...

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        """Requests with equal, non-None keys can share one pipeline call."""
        ...

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        images: Sequence[Sequence[Image.Image]] = (),
        should_cancel: CancelCheck | None = None,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> Sequence[GeneratedImage]: ...

    def resident(self) -> list[str]:
        """Base weights currently loaded (for routing)."""
        ...


class HostedEngine(ImageEngine, Protocol):
    """An engine a served worker runs, which the composition root also warms up and describes:
    ``qwenserve.runtime.Engine`` in this process, ``EngineProcess`` in a child process."""

    def describe(self) -> str: ...

    def warm_up(
        self, slugs: Sequence[str], *, batch_sizes: Sequence[int] = (1,)
    ) -> dict[str, float]: ...


@runtime_checkable
class CountsCompiles(Protocol):
    """An engine that counts its torch.compile work (``qwenserve.runtime.Engine`` does)."""

    def compile_counts(self) -> dict[str, int]: ...


@runtime_checkable
class CountsPipelines(Protocol):
    """An engine that counts pipeline loads and evictions (``qwenserve.runtime.Engine`` does)."""

    def pipeline_counts(self) -> dict[str, dict[str, int]]:
        """``{"loads": {residency key: n}, "evictions": {residency key: n}}``."""
        ...


@runtime_checkable
class ReportsDeviceMemory(Protocol):
    """An engine that reports accelerator memory (``qwenserve.runtime.Engine`` on CUDA)."""

    def device_memory(self) -> dict[str, int]:
        """``{"gpu_allocated": bytes, "gpu_reserved": bytes}``; empty without a GPU."""
        ...
