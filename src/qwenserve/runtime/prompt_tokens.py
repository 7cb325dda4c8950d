"""Counting a prompt's tokens at submit, with the tokenizer the slug's pipeline will use.

An edit pipeline fails on a prompt past ``Recipe.max_prompt_tokens`` (the catalog says why);
the worker refuses one before it runs (``call.check_prompt_tokens``), but only the pipeline's
own tokenizer knows the count, so without this the API would accept such a request, charge it
and queue it, to have it FAILED later. The composition root hands a ``PromptTokenCounter`` to
the API (``Services.prompt_tokens``), which then refuses it at submit with a 400 naming the
field, on every route. Only the tokenizer is loaded (the ``tokenizer`` folder of the base
weights), once per base and lazily: the first prompt to a slug with a limit that is long
enough to need counting pays for it (one of at most that many bytes cannot pass it:
``api/admission.py`` skips the count).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from qwenserve.catalog import Recipe
from qwenserve.runtime.weights import weight_source

log = logging.getLogger("qwenserve.runtime")


class PromptTokenCounter:
    """``count(recipe, text)``: ``text``'s tokens under ``recipe``'s pipeline tokenizer, or
    None when that tokenizer cannot be loaded here (the worker's own check then decides)."""

    def __init__(self, weights: str, cache_dir: Path) -> None:
        self._weights = weights
        self._cache_dir = cache_dir
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, recipe: Recipe, text: str) -> int | None:
        tokenizer = self._tokenizer(recipe)
        if tokenizer is None:
            return None
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokenizer(self, recipe: Recipe) -> Any:
        with self._lock:
            if recipe.base_weights not in self._tokenizers:
                self._tokenizers[recipe.base_weights] = self._load(recipe)
            return self._tokenizers[recipe.base_weights]

    def _load(self, recipe: Recipe) -> Any:
        try:
            from transformers import AutoTokenizer  # the pipelines' own tokenizer class

            source = weight_source(self._weights, self._cache_dir)
            location = source.base_location(recipe.base_weights, recipe.pipeline)
            return AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        except Exception as error:  # no tokenizer here: the worker's check still applies
            log.warning(
                "no tokenizer for %s at submit (%s); long prompts are refused by the worker",
                recipe.base_weights,
                error,
            )
            return None
