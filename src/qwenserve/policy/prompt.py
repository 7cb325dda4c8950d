"""Blocked terms and regular expressions, matched on prompts after Unicode normalization.

A terms file has one entry a line: a plain term, or ``re:`` and a regular expression; blank
lines and lines starting with ``#`` are skipped. Both the text and each plain term are
normalized the same way first (``normalize``: NFKC, format characters such as zero-width spaces
and soft hyphens removed, case-folded), so full-width letters, ligatures, case and invisible
characters do not slip a term through. A plain term matches as whole words (``ass`` does not
block ``class``), whatever spaces or punctuation lie between its words (``forbidden fruit`` also
blocks ``forbidden-fruit``); a regular expression is searched as written in the normalized,
lower-case text.

Plain terms made of word characters are looked up as word n-grams in a set, so the check costs
the same for ten terms or ten thousand; only the regular expressions (and the rare plain term
with other characters) are searched one by one (bench/content_policy.py).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwenserve.policy import PolicyConfigError

if TYPE_CHECKING:
    from qwenserve.config import Settings

REGEX_PREFIX = "re:"


def normalize(text: str) -> str:
    """NFKC, without format characters (Unicode category Cf: zero-width spaces and joiners,
    soft hyphens, bidi marks), case-folded."""
    folded = unicodedata.normalize("NFKC", text)
    if not folded.isascii():
        folded = "".join(c for c in folded if unicodedata.category(c) != "Cf")
    return folded.casefold()


_WORD = re.compile(r"\w+")


def _term_pattern(term: str) -> re.Pattern[str]:
    words = [re.escape(word) for word in term.split()]
    return re.compile(r"(?<!\w)" + r"\W+".join(words) + r"(?!\w)")


@dataclass(frozen=True)
class PromptPolicy:
    """What a prompt may not contain: ``terms`` (normalized) and ``patterns``."""

    terms: tuple[str, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()
    _ngrams: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    _lengths: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)
    _searched: tuple[re.Pattern[str], ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        worded = [t for t in self.terms if _WORD.findall(t) == t.split()]
        others = [_term_pattern(t) for t in self.terms if _WORD.findall(t) != t.split()]
        object.__setattr__(self, "_ngrams", frozenset(worded))
        object.__setattr__(self, "_lengths", tuple(sorted({len(t.split()) for t in worded})))
        object.__setattr__(self, "_searched", (*others, *self.patterns))

    @classmethod
    def from_lines(cls, lines: Iterable[str], *, source: str = "blocked terms") -> PromptPolicy:
        """Parse a terms file's lines (see the module docstring).

        Raises:
            PolicyConfigError: an invalid regular expression, naming ``source`` and its line.
        """
        terms: list[str] = []
        patterns: list[re.Pattern[str]] = []
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(REGEX_PREFIX):
                expression = line.removeprefix(REGEX_PREFIX).strip()
                try:
                    patterns.append(re.compile(expression))
                except re.error as error:
                    raise PolicyConfigError(
                        f"{source} line {number}: invalid regular expression: {error}"
                    ) from None
            else:
                term = " ".join(normalize(line).split())
                if term:
                    terms.append(term)
        return cls(tuple(terms), tuple(patterns))

    @classmethod
    def load(cls, path: Path) -> PromptPolicy:
        """Read a terms file (UTF-8).

        Raises:
            PolicyConfigError: it cannot be read, or a line is an invalid regular expression.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyConfigError(f"cannot read the blocked terms file {path}: {error}") from None
        return cls.from_lines(text.splitlines(), source=str(path))

    def blocks(self, text: str) -> bool:
        """Whether ``text`` contains a blocked term or matches a blocked expression."""
        normalized = normalize(text)
        if self._ngrams:
            words = _WORD.findall(normalized)
            for n in self._lengths:
                for start in range(len(words) - n + 1):
                    if " ".join(words[start : start + n]) in self._ngrams:
                        return True
        return any(pattern.search(normalized) for pattern in self._searched)

    def blocked_field(self, fields: Mapping[str, str | None]) -> str | None:
        """The first of ``fields`` (name → text) that is blocked, or None."""
        for name, text in fields.items():
            if text and self.blocks(text):
                return name
        return None


def prompt_policy(settings: Settings) -> PromptPolicy | None:
    """The blocked terms ``settings`` name, or None with the content policy off.

    Raises:
        PolicyConfigError: the policy is on without a terms file (an empty file is the way to
            block no term: an omission never switches the prompt check off silently), or the
            file cannot be read, or it has an invalid expression.
    """
    if settings.content_policy == "off":
        return None
    if settings.blocked_terms_file is None:
        raise PolicyConfigError(
            f"content_policy={settings.content_policy} needs a blocked terms file "
            "(QWENSERVE_BLOCKED_TERMS_FILE; an empty file blocks no term)"
        )
    return PromptPolicy.load(settings.blocked_terms_file)
