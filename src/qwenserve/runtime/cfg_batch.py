"""CFG's two transformer passes as one batch, without forking the diffusers pipeline.

With true CFG on, ``QwenImagePipeline`` calls its transformer twice per step: once with the
prompt ("cond"), then with the negative prompt ("uncond"), on the same latents and timestep.
Two half-size calls leave a GPU idle between kernels at small sizes and double the per-call
overhead everywhere. The pipeline has no switch to batch them, so the engine wraps the
transformer's ``forward``:

- Before the pipeline runs, the engine *arms* the wrapper with the negative prompt's embeddings
  (it computed them itself through the prompt cache).
- On a call that is not the armed negative, the wrapper runs one transformer call on
  ``[cond; uncond]`` (text padded to one length, the padding masked out, as a batch of prompts
  is), returns the cond half and keeps the uncond half. Where both texts are unpadded and of one
  length (known on the host: the pipeline passes ``None`` for an all-ones mask, the engine arms
  ``None`` for one), the paired call gets no mask either, so attention can take its flash
  kernels.
- On the next call, if and only if it asks for exactly what was kept (the same latents tensor,
  negative embeddings and mask, and a timestep of the same shape), the kept half is returned;
  anything else is computed normally: a mismatch costs one extra call.
- The timestep's *values* are compared without a device sync per step: the comparisons stay on
  the device, and their result is read once when the call ends; a mismatch then fails the call
  (``InferenceError``, the image discarded) rather than return a wrong half. The pipeline asks
  both passes of a step with the same latents and timestep, so that never happens in practice.
  The embeddings are compared by value once per call (the pipeline passes the same objects on
  every step).

The result equals two separate calls up to float rounding in the batched kernels (the same
bound as request batching: tests/runtime/test_cfg_batch.py). Not used with ``compile`` (data
checks in the wrapper would break the graph) or ``step_cache`` (its hooks keep one cache per
pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qwenserve.errors import InferenceError


def _mask_or_ones(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """None means all ones (the pipeline drops such a mask); an explicit one to compare or pad."""
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return mask


def _pad_to(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 (the text length) of [B, L] or [B, L, D] to ``length``."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    padding = (0, 0, 0, missing) if tensor.dim() == 3 else (0, missing)
    return F.pad(tensor, padding)


@dataclass
class _Kept:
    """The uncond half of a paired call, for the next call if it asks exactly that."""

    latents: torch.Tensor
    timestep: torch.Tensor
    output: torch.Tensor


class CfgBatcher:
    """Wraps ``transformer.forward`` (in place) so armed CFG calls run as one batch."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self._forward = transformer.forward
        transformer.forward = self._call
        self._armed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._seen_negative: tuple[torch.Tensor, torch.Tensor | None] | None = None
        """The (embeds, mask) objects last found equal to the armed negative: the pipeline
        passes the same objects every step, so the values are compared once per call."""
        self._seen_other: tuple[torch.Tensor, torch.Tensor | None] | None = None
        """Likewise the last (embeds, mask) found to differ from it (the prompt's own)."""
        self._kept: _Kept | None = None
        self._timestep_mismatch: torch.Tensor | None = None
        """On the device: whether any answered pass had another timestep than its pair's."""
        self.batched_calls = 0
        """Transformer calls that served both passes (for tests and metrics)."""

    @contextmanager
    def armed(
        self, negative_embeds: torch.Tensor, negative_mask: torch.Tensor | None
    ) -> Iterator[None]:
        """Within this block, a transformer call with other text also computes this negative.

        ``negative_mask`` None: all ones. Raises InferenceError at the end of the block if a
        pass was answered from a pair computed at another timestep."""
        self._armed = (negative_embeds, negative_mask)
        self._seen_negative = self._seen_other = None
        self._kept = None
        self._timestep_mismatch = None
        try:
            yield
            mismatch = self._timestep_mismatch
            if mismatch is not None and bool(mismatch):  # the one sync per call
                raise InferenceError(
                    "CFG pairing answered a pass computed at another timestep; the image was "
                    "discarded (set cfg_batch off and report this)"
                )
        finally:
            self._armed = None
            self._seen_negative = self._seen_other = None
            self._kept = None
            self._timestep_mismatch = None

    def _is_armed_negative(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether ``embeds``/``mask`` are the armed negative prompt (by value, then by identity
        for the same objects on the following steps)."""
        assert self._armed is not None
        for seen, answer in ((self._seen_negative, True), (self._seen_other, False)):
            if seen is not None and embeds is seen[0] and mask is seen[1]:
                return answer
        negative, negative_mask = self._armed
        same = (
            embeds.shape == negative.shape
            and torch.equal(embeds, negative)
            and (
                (mask is None and negative_mask is None)
                or torch.equal(
                    _mask_or_ones(embeds, mask).long(),
                    _mask_or_ones(negative, negative_mask).long(),
                )
            )
        )
        if same:
            self._seen_negative = (embeds, mask)
        else:
            self._seen_other = (embeds, mask)
        return same

    def _call(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_shapes: list[Any] | None = None,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **extra: Any,
    ) -> Any:
        kept, self._kept = self._kept, None
        if (
            kept is not None
            and hidden_states is kept.latents
            and timestep is not None
            and timestep.shape == kept.timestep.shape
            and encoder_hidden_states is not None
            and self._is_armed_negative(encoder_hidden_states, encoder_hidden_states_mask)
        ):
            self._note_timestep(timestep, kept.timestep)
            return self._package(kept.output, return_dict)
        call = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "encoder_hidden_states_mask": encoder_hidden_states_mask,
            "timestep": timestep,
            "img_shapes": img_shapes,
            "guidance": guidance,
            "attention_kwargs": attention_kwargs,
            "return_dict": return_dict,
            **extra,
        }
        if not self._can_pair(call):
            return self._forward(**call)
        assert self._armed is not None and encoder_hidden_states is not None
        assert timestep is not None and img_shapes is not None
        negative, negative_mask = self._armed
        length = max(encoder_hidden_states.shape[1], negative.shape[1])
        embeds = torch.cat([_pad_to(encoder_hidden_states, length), _pad_to(negative, length)])
        masks: torch.Tensor | None = None
        unpadded = encoder_hidden_states.shape[1] == negative.shape[1]
        if not (unpadded and encoder_hidden_states_mask is None and negative_mask is None):
            mask = _mask_or_ones(encoder_hidden_states, encoder_hidden_states_mask)
            other = _mask_or_ones(negative, negative_mask).to(mask.dtype)
            masks = torch.cat([_pad_to(mask, length), _pad_to(other, length)])
        output = self._forward(
            hidden_states=torch.cat([hidden_states, hidden_states]),
            encoder_hidden_states=embeds.to(encoder_hidden_states.dtype),
            encoder_hidden_states_mask=masks,
            timestep=torch.cat([timestep, timestep]),
            img_shapes=list(img_shapes) * 2,
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        batch = hidden_states.shape[0]
        self._kept = _Kept(hidden_states, timestep.clone(), output[batch:])
        self.batched_calls += 1
        return self._package(output[:batch], return_dict)

    def _note_timestep(self, timestep: torch.Tensor, paired: torch.Tensor) -> None:
        """Remember, on the device, whether ``timestep`` differs from the pair's (no sync)."""
        differs = (timestep.to(paired.dtype) != paired).any()
        previous = self._timestep_mismatch
        self._timestep_mismatch = differs if previous is None else previous | differs

    def _can_pair(self, call: dict[str, Any]) -> bool:
        """Armed, a plain call (no guidance embedding or extras), not the negative itself."""
        if self._armed is None:
            return False
        negative, _ = self._armed
        embeds = call["encoder_hidden_states"]
        timestep = call["timestep"]
        extras = [k for k in call if k not in _PLAIN_ARGUMENTS and call[k] is not None]
        return (
            not extras
            and call["guidance"] is None
            and embeds is not None
            and timestep is not None
            and call["img_shapes"] is not None
            and embeds.shape[0] == negative.shape[0] == call["hidden_states"].shape[0]
            and timestep.shape[0] == embeds.shape[0]
            and not self._is_armed_negative(embeds, call["encoder_hidden_states_mask"])
        )

    @staticmethod
    def _package(output: torch.Tensor, return_dict: bool) -> Any:
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=output)
        return (output,)


_PLAIN_ARGUMENTS = frozenset(
    {
        "hidden_states",
        "encoder_hidden_states",
        "encoder_hidden_states_mask",
        "timestep",
        "img_shapes",
        "guidance",
        "attention_kwargs",
        "return_dict",
    }
)
