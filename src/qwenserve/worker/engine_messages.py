"""What the worker's parent process and its engine child say to each other: small frozen
dataclasses over one ``multiprocessing`` pipe, plus the images beside it.

Parent → child: ``Generate`` (a call: one request or a batch), ``Cancel`` (any time; the child
honours it at the call's next denoising step), ``WarmUp``, ``CountTokens``.
Child → parent: ``Ready`` once, then per call ``Step`` and ``Preview`` as they happen and one
``Result`` or ``Failed``; ``Stats`` (what routing and metrics read) before each answer;
``WarmedUp`` and ``TokenCount`` answer theirs.

Pixels never go through the pipe: each image is written once as raw bytes to a file in the
link's exchange folder (on ``/dev/shm`` where there is one, so it is shared memory) and the
message carries only its ``ImageRef``; the reader deletes the file once it has the image.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from qwenserve.catalog import GenerationRequest, Recipe

_counter = itertools.count()


@dataclass(frozen=True)
class ImageRef:
    """One image's raw pixels in a file of the exchange folder (no header: the mode and size
    are here)."""

    path: str
    mode: str
    width: int
    height: int


def exchange_folder() -> Path:
    """A new private folder for one child's images: in ``/dev/shm`` (memory) where it exists."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="qwenserve-engine-", dir=base))


def put_image(folder: Path, image: Image.Image) -> ImageRef:
    """Write ``image``'s pixels to a new file in ``folder`` (the one copy the boundary makes)."""
    path = folder / f"{os.getpid()}-{next(_counter)}.raw"
    path.write_bytes(image.tobytes())
    return ImageRef(str(path), image.mode, image.width, image.height)


def take_image(ref: ImageRef) -> Image.Image:
    """The image ``ref`` names, its file deleted (each image is read once)."""
    path = Path(ref.path)
    try:
        return Image.frombytes(ref.mode, (ref.width, ref.height), path.read_bytes())
    finally:
        path.unlink(missing_ok=True)


# --- parent → child ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Generate:
    """Run ``requests`` as one pipeline call (``batch``: through ``generate_batch``)."""

    call_id: int
    requests: tuple[GenerationRequest, ...]
    images: tuple[tuple[ImageRef, ...], ...]
    """Per request, its decoded input images (``request.images`` order)."""
    extra_loras: tuple[str, ...] = ()
    """Local LoRA files for a single request, active for this call only."""
    batch: bool = False
    previews: bool = False
    """Send the previews the requests' ``partial_images`` ask for."""


@dataclass(frozen=True)
class Cancel:
    """Stop call ``call_id`` at its next denoising step (every job in it stopped)."""

    call_id: int


@dataclass(frozen=True)
class WarmUp:
    """Load (and with compile on, compile) these slugs before any job."""

    call_id: int
    slugs: tuple[str, ...]
    batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class CountTokens:
    """``text``'s tokens under ``recipe``'s pipeline tokenizer (admission's prompt check)."""

    call_id: int
    recipe: Recipe
    text: str


# --- child → parent ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """The engine is built (torch imported, device chosen): calls may come."""

    pid: int
    description: str
    device_type: str


@dataclass(frozen=True)
class Step:
    call_id: int
    done: int
    total: int


@dataclass(frozen=True)
class Preview:
    call_id: int
    index: int
    """The request's index in the call."""
    preview_index: int
    image: ImageRef


@dataclass(frozen=True)
class Output:
    """One request's image of a ``Result``, as ``GeneratedImage`` has it."""

    image: ImageRef
    seed: int
    width: int
    height: int
    inference_time_s: float


@dataclass(frozen=True)
class Result:
    call_id: int
    outputs: tuple[Output, ...]


@dataclass(frozen=True)
class Failed:
    """A call (or warm-up, or count) raised. ``error_type`` is the exception's class name: a
    ``qwenserve.errors`` class is rebuilt as itself (``field`` and ``fields`` kept), any other
    is a crash whose text the parent logs but never shows a client."""

    call_id: int
    error_type: str
    message: str
    field: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    """An ``InvalidRequest``'s every bad field: (field, message) pairs."""


@dataclass(frozen=True)
class Stats:
    """What the parent reads between calls without asking: routing's resident models, the
    registry's compile counts and the metrics' pipeline counts and device memory."""

    resident: tuple[str, ...] = ()
    compile_counts: dict[str, int] = field(default_factory=dict)
    pipeline_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    device_memory: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WarmedUp:
    call_id: int
    timings: dict[str, float]


@dataclass(frozen=True)
class TokenCount:
    call_id: int
    count: int | None


ToChild = Generate | Cancel | WarmUp | CountTokens
ToParent = Ready | Step | Preview | Result | Failed | Stats | WarmedUp | TokenCount
