"""Engines for a child process that fail the ways real ones do, without torch: built by
``EngineSpec("tests.worker_process.engines:FakeEngine", config)`` in the child.

The prompt says what happens: ``sigkill`` / ``segfault`` kill the child at the first step (as
the OOM killer or a kernel fault would), ``sigkill-once`` only the first time (a marker file
in ``config["marker_dir"]`` remembers it), ``raise`` raises an ``InvalidInput`` naming a field.
Anything else paints the seed into a small image after ``steps`` steps of ``step_s``."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from qwenserve.catalog import GenerationRequest
from qwenserve.errors import InferenceError, InvalidInput
from qwenserve.runtime.config import GeneratedImage


class FakeEngine:
    def __init__(self, config: dict[str, Any]) -> None:
        self.step_s = float(config.get("step_s", 0.0))
        self.marker_dir = Path(config["marker_dir"]) if config.get("marker_dir") else None
        self.calls = 0

    def describe(self) -> str:
        return "fake engine"

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        return None

    def resident(self) -> list[str]:
        return ["fake/base"] if self.calls else []

    def pipeline_counts(self) -> dict[str, dict[str, int]]:
        return {"loads": {"fake/base": 1}} if self.calls else {}

    def warm_up(
        self, slugs: Sequence[str], *, batch_sizes: Sequence[int] = (1,)
    ) -> dict[str, float]:
        self.calls += 1
        return {slug: 0.0 for slug in slugs}

    def generate(
        self,
        request: GenerationRequest,
        *,
        images: Sequence[Image.Image] = (),
        extra_loras: Sequence[Path] = (),
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_preview: Callable[[int, int, Image.Image], None] | None = None,
    ) -> GeneratedImage:
        return self.generate_batch(
            [request],
            images=[images],
            on_step=on_step,
            should_cancel=should_cancel,
            on_preview=on_preview,
        )[0]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        images: Sequence[Sequence[Image.Image]] = (),
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        on_preview: Callable[[int, int, Image.Image], None] | None = None,
    ) -> list[GeneratedImage]:
        self.calls += 1
        first = requests[0]
        if first.prompt == "raise":
            raise InvalidInput("image: not an image this engine can read", field="image")
        for step in range(first.steps):
            time.sleep(self.step_s)
            self._maybe_die(first.prompt)
            if on_step is not None:
                on_step(step + 1, first.steps)
            if on_preview is not None:
                on_preview(0, step, Image.new("RGB", (8, 8), (step, 0, 0)))
            if should_cancel is not None and should_cancel():
                raise InferenceError("cancelled")
        sizes = [
            images[i][0].size if images and images[i] else (32, 16) for i in range(len(requests))
        ]
        return [
            GeneratedImage(
                Image.new("RGB", size, (r.seed % 256, 0, 0)), r.seed, size[0], size[1], 0.01
            )
            for r, size in zip(requests, sizes, strict=True)
        ]

    def _maybe_die(self, prompt: str) -> None:
        if prompt == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if prompt == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if prompt == "sigkill-once" and self.marker_dir is not None:
            marker = self.marker_dir / "died-once"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)


def failing_build(config: object) -> object:
    """A factory that cannot build its engine (a child that dies before it is ready)."""
    raise InferenceError("no such device: tpu")
