"""A bounded cache of text-encoder outputs, so a repeated prompt skips the text encoder.

Each prompt is encoded alone (exactly what a one-prompt pipeline call computes) and kept on the
pipeline's device, keyed by what decides the embedding: the base weights, the pipeline's prompt
template and the prompt text. A batch stacks its prompts' cached rows, zero-padded to the longest
with a 0/1 mask, the layout the pipeline builds itself. An entry is at most 1024 tokens x the text
width (7 MiB at 3584 bf16); typical prompts take a few hundred KiB.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PromptKey:
    """What a prompt's embedding depends on."""

    base_weights: str
    template: str
    prompt: str
    max_sequence_length: int


class PromptCache:
    """LRU of ``PromptKey`` → (embedding [1, L, D], mask [1, L]); ``max_entries`` 0 disables."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be 0 or more")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PromptKey, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._full: set[PromptKey] = set()
        """Keys whose mask is all ones (the pipeline returned none): known without a sync."""
        self._all_ones: weakref.WeakValueDictionary[int, torch.Tensor] = (
            weakref.WeakValueDictionary()
        )
        """Batch masks ``encode`` returned that are all ones (every row full, one length), by
        id: a tensor's ``==`` compares values, so no set of tensors."""

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._full.clear()

    def unless_all_ones(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """None for a mask ``encode`` returned that is all ones, else ``mask``: attention then
        runs unmasked (flash kernels) without a device sync to find that out."""
        known = mask is not None and self._all_ones.get(id(mask)) is mask
        return None if known else mask

    def _one(self, pipe: Any, key: PromptKey) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(embeds, mask, whether the mask is all ones)."""
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return (*entry, key in self._full)
        self.misses += 1
        with torch.no_grad():  # the pipeline's __call__ has it; encode_prompt alone does not
            embeds, mask = pipe.encode_prompt(
                prompt=key.prompt,
                device=pipe._execution_device,
                max_sequence_length=key.max_sequence_length,
            )
        full = mask is None
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        entry = (embeds.detach(), mask.detach())
        if self.max_entries > 0:
            self._entries[key] = entry
            if full:
                self._full.add(key)
            while len(self._entries) > self.max_entries:
                self._full.discard(self._entries.popitem(last=False)[0])
        return (*entry, full)

    def encode(
        self,
        pipe: Any,
        base_weights: str,
        prompts: Sequence[str],
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, L, D] and mask [B, L] for ``prompts``, from the cache where present."""
        template = str(getattr(pipe, "prompt_template_encode", ""))
        rows = [
            self._one(pipe, PromptKey(base_weights, template, prompt, max_sequence_length))
            for prompt in prompts
        ]
        length = max(embeds.shape[1] for embeds, _mask, _full in rows)
        pad = torch.nn.functional.pad
        padded = [pad(embeds, (0, 0, 0, length - embeds.shape[1])) for embeds, _, _ in rows]
        mask = torch.cat([pad(mask, (0, length - mask.shape[1])) for _, mask, _ in rows])
        if all(full and embeds.shape[1] == length for embeds, _, full in rows):
            self._all_ones[id(mask)] = mask
        return torch.cat(padded), mask
