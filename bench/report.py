"""Appending a benchmark's results to docs/PERFORMANCE.md with date, machine and command."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"1-min load {load:.2f} at the end"
    )


def append_section(title: str, lines: list[str], notes: Sequence[str] = ()) -> None:
    """Record ``title`` with the date, machine, the command that ran (this process's argv) and
    ``lines`` (a table), replacing the previous run's section of the same title."""
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    )
    section = [
        "",
        f"## {title}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        *[f"- {n}" for n in notes],
        "",
        *lines,
        "",
    ]
    write_section(title, "\n".join(section))


def write_section(title: str, text: str) -> None:
    """Put ``text`` (a section starting with ``## title``) in the doc: in place of the section
    with the same title (the doc keeps each benchmark's latest run), else at the end."""
    if not DOC.exists():
        DOC.write_text("# Performance\n\nEvery figure here comes from a command in bench/.\n")
    doc = DOC.read_text()
    heading = f"\n## {title}\n"
    start = doc.find(heading)
    if start < 0:
        DOC.write_text(doc.rstrip("\n") + "\n" + text.rstrip("\n") + "\n")
        return
    end = doc.find("\n## ", start + len(heading))
    rest = doc[end:] if end >= 0 else "\n"
    DOC.write_text(doc[:start] + "\n" + text.strip("\n") + "\n" + rest)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out
