"""README.md's fenced code blocks, as the README test runs them (tests/service/test_readme.py).

A block's fence info string is its language, then flags: ```` ```bash norun ```` marks a block
that is not meant to run (the README says why, next to it). Shell (``bash``, ``sh``) and
``python`` blocks are the runnable kinds; others (a folder layout, text) are only shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
RUNNABLE_LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (1-based line of its opening fence), what it says."""

    line: int
    language: str
    flags: frozenset[str]
    text: str

    @property
    def kind(self) -> str | None:
        """``bash`` or ``python`` for a runnable kind, else None."""
        return RUNNABLE_LANGUAGES.get(self.language)

    @property
    def norun(self) -> bool:
        return "norun" in self.flags

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.language}"


def blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, in order (a fence closes with the same marker)."""
    found: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        marker, info = opening.group(1), opening.group(2).split()
        start = index + 1  # 1-based line of the opening fence
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].startswith(marker):
            body.append(lines[index])
            index += 1
        language = info[0].lower() if info else ""
        flags = frozenset(word.lower() for word in info[1:])
        found.append(Block(start, language, flags, "\n".join(body) + "\n"))
        index += 1
    return found


def readme_blocks(path: Path = README) -> list[Block]:
    return blocks(path.read_text(encoding="utf-8"))
