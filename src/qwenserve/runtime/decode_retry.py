"""A VAE decode that runs out of memory is retried tiled, then one image at a time.

The denoising loop costs tens of seconds on a GPU; the decode at its end can still run out of
memory (a batch at 1-2 MP, a neighbour on the card). Retrying the whole call would run the
transformer again. Instead, for the length of one pipeline call, ``vae.decode`` is wrapped: on
an out-of-memory error it frees what the failed decode held and decodes the *same latents*
again, tiled (diffusers' ``enable_tiling``), and if that still does not fit, also sliced
(``enable_slicing``: one image of the batch at a time). Only when every way fails does the error
reach the caller. The VAE's own tiling and slicing switches are restored after a call that
retried (the next call sets tiling from its plan anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger("qwenserve.runtime")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's typed error, or the CPU allocator's plain RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def _ways(vae: Any) -> list[tuple[bool, bool]]:
    """The (tiling, slicing) settings still to try after the VAE's current ones failed."""
    current = (bool(getattr(vae, "use_tiling", False)), bool(getattr(vae, "use_slicing", False)))
    ways = [(True, current[1]), (True, True)]
    return [way for way in dict.fromkeys(ways) if way != current]


def _set(vae: Any, tiling: bool, slicing: bool) -> None:
    (vae.enable_tiling if tiling else vae.disable_tiling)()
    (vae.enable_slicing if slicing else vae.disable_slicing)()


@contextmanager
def decode_retried_on_oom(pipe: Any, free_memory: Callable[[], None]) -> Iterator[None]:
    """Within this scope, ``pipe.vae.decode`` retries an out-of-memory decode of the same
    latents tiled, then tiled and one image at a time, calling ``free_memory`` before each
    retry; the last out-of-memory error propagates when none fits. A pipeline without a VAE
    (or without diffusers' tiling switches) runs unchanged."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not all(
        hasattr(vae, name) for name in ("enable_tiling", "enable_slicing", "decode")
    ):
        yield
        return
    original = vae.decode  # bound (with diffusers' offload hook decorator)
    before = (bool(getattr(vae, "use_tiling", False)), bool(getattr(vae, "use_slicing", False)))
    retried = False

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        nonlocal retried
        ways = _ways(vae)
        while True:
            try:
                return original(latents, *args, **kwargs)
            except Exception as error:
                if not is_out_of_memory(error) or not ways:
                    raise
            # Outside the except block: the error's frames held the failed decode's tensors.
            tiling, slicing = ways.pop(0)
            how = "tiled+sliced" if slicing else "tiled"
            retried = True
            log.warning(
                "VAE decode of latents %s ran out of memory; retrying it %s (the denoised "
                "latents are kept)",
                tuple(latents.shape),
                how,
            )
            free_memory()
            _set(vae, tiling, slicing)

    vae.decode = decode  # an instance attribute, for this call only: removed below
    try:
        yield
    finally:
        del vae.decode
        if retried:  # only a retry changes the switches
            _set(vae, *before)
