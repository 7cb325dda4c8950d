"""A small byte-level BPE tokenizer that stands in for Qwen's in the tiny preset.

The Qwen-Image pipelines wrap every prompt in a fixed system template and then drop a hard-coded
number of leading hidden states (34 for text-to-image, 64 for the edit pipelines): the token count
of that template prefix under the real Qwen tokenizer. A locally built tokenizer must reproduce
those counts exactly, or the prompt embeddings silently keep template tokens or lose prompt
tokens. So the vocabulary is trained (deterministically) on the templates the installed diffusers
pipelines use, which makes every template word one token, and then a few words that occur in only
one prefix lose their final merge until each prefix has exactly its pipeline's drop count.
Arbitrary text still tokenizes: all 256 byte symbols are in the vocabulary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

# The pretokenizer regex of Qwen2's tokenizer (transformers' Qwen2Tokenizer uses the same one).
_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
# The drop covers the system turn and the opening of the user turn.
_PREFIX_END = f"{IM_START}user\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A pipeline's prompt template and how many leading tokens it drops after encoding."""

    template: str
    drop_tokens: int

    @property
    def prefix(self) -> str:
        """The dropped part: the template up to and including the user turn's opening."""
        end = self.template.index(_PREFIX_END) + len(_PREFIX_END)
        return self.template[:end]


def _pretokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _plain_segments(text: str) -> list[str]:
    """The text between special tokens (special tokens are matched before pretokenizing)."""
    return [part for part in _SPECIAL_SPLIT.split(text) if part]


def _words(text: str) -> list[str]:
    pre = _pretokenizer()
    words: list[str] = []
    for segment in _plain_segments(text):
        words.extend(word for word, _ in pre.pre_tokenize_str(segment))
    return words


def _train(corpus: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE trained to completion on ``corpus``: every corpus word becomes one token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pretokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # never the limit: training stops when no pair is left
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in state["merges"]]
    return dict(state["vocab"]), [(a, b) for a, b in merges]


def build_tiny_tokenizer(templates: Sequence[PromptTemplate]) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer whose vocabulary makes each template's prefix exactly its drop count.

    Raises ValueError when that is impossible (a prefix has more words than its drop count).
    """
    corpus = [segment for t in templates for segment in _plain_segments(t.template)]
    vocab, merges = _train(corpus)

    # Words that appear in exactly one template prefix can be split without touching another.
    prefix_words = [_words(t.prefix) for t in templates]
    removed: set[str] = set()
    for index, template in enumerate(templates):
        specials = len(_SPECIAL_SPLIT.findall(template.prefix))
        missing = template.drop_tokens - (len(prefix_words[index]) + specials)
        if missing < 0:
            raise ValueError(
                f"template prefix has {len(prefix_words[index]) + specials} words, more than the "
                f"{template.drop_tokens} tokens its pipeline drops"
            )
        others = {w for j, words in enumerate(prefix_words) if j != index for w in words}
        candidates = [
            w
            for w in dict.fromkeys(prefix_words[index])
            if w not in others and prefix_words[index].count(w) == 1 and len(w) > 3
        ]
        candidates.sort(key=lambda w: (-len(w), w))
        if len(candidates) < missing:
            raise ValueError("not enough unique template words to split")
        removed.update(candidates[:missing])

    # Dropping the merge that completes a whole word leaves that word as two tokens; nothing
    # else is built from a whole word, so no other word changes.
    merges = [(a, b) for a, b in merges if a + b not in removed]
    for word in removed:
        del vocab[word]
    ordered = sorted(vocab, key=vocab.__getitem__)
    dense_vocab = {token: index for index, token in enumerate(ordered)}
    for special in SPECIAL_TOKENS:
        dense_vocab[special] = len(dense_vocab)

    # transformers' annotations say list[str]; the tokenizers backend wants (left, right) pairs.
    pairs: Any = merges
    no_unknown: Any = None  # byte-level: every input is covered, nothing is unknown
    tokenizer = Qwen2Tokenizer(
        vocab=dense_vocab,
        merges=pairs,
        unk_token=no_unknown,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=list(SPECIAL_TOKENS),
        model_max_length=32768,
        padding_side="right",
    )
    for template in templates:
        count = len(tokenizer(template.prefix)["input_ids"])
        if count != template.drop_tokens:  # pragma: no cover - guarded by the tests
            raise ValueError(f"template prefix tokenizes to {count}, not {template.drop_tokens}")
    return tokenizer
