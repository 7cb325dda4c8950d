"""Silencing the libraries' own progress bars around loading and saving.

Loading and saving print a tqdm bar per component; in a server those are noise on stderr (the
engine logs one line per load, with its duration), and denoising progress goes to ``on_step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No diffusers/transformers progress bars inside the block."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
