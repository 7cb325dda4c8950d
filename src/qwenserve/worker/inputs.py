"""Fetching and checking a job's inputs (images, extra LoRAs) before the engine sees them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from qwenserve.catalog import GenerationRequest
from qwenserve.catalog.request import InputImage
from qwenserve.errors import InputUnavailable, InvalidInput, UpstreamError, UpstreamTimeout
from qwenserve.jobs import Job
from qwenserve.media.fetch import UrlFetcher
from qwenserve.media.inline import stored_media_id
from qwenserve.media.inputs import decode_image, load_input_image
from qwenserve.media.lora import LoraCacheCounts, LoraFetcher
from qwenserve.media.storage import MediaStore

if TYPE_CHECKING:
    from PIL import Image

    from qwenserve.config import Settings


class InputLoader(Protocol):
    """Turns a request's image sources and LoRA locations into local, checked inputs."""

    def load_images(self, request: GenerationRequest) -> list[Image.Image]: ...

    def load_loras(self, request: GenerationRequest) -> list[Path]: ...


@runtime_checkable
class CountsLoraCache(Protocol):
    """An input loader that counts LoRA cache hits and misses (``MediaInputLoader`` does)."""

    def lora_cache_counts(self) -> dict[str, int]: ...


@dataclass
class Prepared:
    """A claimed job decoded, with its inputs fetched and checked: ready for the engine."""

    job: Job
    request: GenerationRequest
    images: list[Image.Image]
    loras: list[Path]


class MediaInputLoader:
    """The worker's InputLoader: SSRF-guarded fetches, defensive decoding, a LoRA file cache."""

    def __init__(
        self,
        *,
        fetcher: UrlFetcher,
        loras: LoraFetcher,
        max_bytes: int,
        max_pixels: int,
        media: MediaStore | None = None,
    ):
        self.fetcher = fetcher
        self.loras = loras
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.media = media
        """Where the API stored inline images (``stored:`` sources, media/inline.py)."""
        self.lora_counts = LoraCacheCounts()
        """This loader's LoRA cache hits and misses (one loader per worker: its /metrics)."""

    def for_worker(self) -> MediaInputLoader:
        """A loader sharing these fetchers and caches, counting its LoRA cache use apart (each
        worker reports its own counts)."""
        return MediaInputLoader(
            fetcher=self.fetcher,
            loras=self.loras,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            media=self.media,
        )

    def lora_cache_counts(self) -> dict[str, int]:
        """LoRA cache ``hits`` and ``misses`` of this loader so far."""
        return {"hits": self.lora_counts.hits, "misses": self.lora_counts.misses}

    @classmethod
    def from_settings(cls, settings: Settings, media: MediaStore | None = None) -> MediaInputLoader:
        fetcher = UrlFetcher(
            allow_private=settings.allow_private_urls,
            timeout_s=settings.fetch_timeout_s,
            max_bytes=settings.max_input_bytes,
        )
        loras = LoraFetcher(
            settings.model_cache_dir,
            fetcher=fetcher,
            max_bytes=settings.max_lora_bytes,
            local_dirs=settings.local_lora_dirs,
        )
        return cls(
            fetcher=fetcher,
            loras=loras,
            max_bytes=settings.max_input_bytes,
            max_pixels=settings.max_input_pixels,
            media=media,
        )

    def load_images(self, request: GenerationRequest) -> list[Image.Image]:
        return [self._load(image) for image in request.images]

    def _load(self, image: InputImage) -> Image.Image:
        media_id = stored_media_id(image.source)
        if media_id is None:
            with caller_url(image.field):
                return load_input_image(
                    image.source,
                    field=image.field,
                    fetcher=self.fetcher,
                    max_bytes=self.max_bytes,
                    max_pixels=self.max_pixels,
                )
        stored = self.media.get(media_id, now=time.time()) if self.media is not None else None
        if stored is None:
            raise InvalidInput(
                f"{image.field}: the uploaded image is gone (it expired with the request)",
                field=image.field,
            )
        return decode_image(stored[0], field=image.field, max_pixels=self.max_pixels)

    def load_loras(self, request: GenerationRequest) -> list[Path]:
        paths = []
        for ref in request.extra_loras:
            with caller_url(ref.field):
                paths.append(
                    self.loras.resolve(ref.location, field=ref.field, counts=self.lora_counts)
                )
        return paths


@contextmanager
def caller_url(field: str) -> Iterator[None]:
    """A fetch of a URL the caller named that fails (HTTP error status, unknown host, refused
    connection, no answer in time) is the caller's input at fault: ``InputUnavailable`` (a 4xx
    naming ``field``, the job FAILED and refunded), never a 5xx of this server."""
    try:
        yield
    except (UpstreamError, UpstreamTimeout) as failed:
        raise InputUnavailable(failed.message, field=failed.field or field) from failed
