"""Appending a benchmark's results to docs/PERFORMANCE.md with date, machine and command.

Every script in bench/ takes the same output options (``bench_args``): ``--doc PATH`` (the file
its section goes to; docs/PERFORMANCE.md by default), ``--no-write`` (no section at all),
``--json PATH`` (its figures as JSON, what the smoke tests read) and ``--quick`` (its smallest
settings: a smoke run whose figures are not to be quoted; explicit options still win)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"
QUICK_NOTE = "quick run (`--quick`, the smallest settings): a smoke run, not figures to quote"


def bench_args(
    parser: argparse.ArgumentParser, quick: Mapping[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Add the common output options to ``parser`` and parse; ``quick`` holds the settings
    ``--quick`` gives (as defaults, so an option given on the command line still wins)."""
    shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
    parser.add_argument(
        "--quick", action="store_true", help=f"smallest settings, a smoke run ({shown})"
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="the file the section goes to")
    parser.add_argument("--no-write", action="store_true", help="write no section")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def publish(
    args: argparse.Namespace,
    title: str,
    lines: list[str],
    notes: Sequence[str] = (),
    figures: Mapping[str, Any] | None = None,
) -> None:
    """The end of every benchmark: ``figures`` to ``--json`` when given, and the section
    (``append_section``) to ``--doc`` unless ``--no-write``."""
    if figures is not None:
        write_json(args, figures)
    if not args.no_write:
        quick = [QUICK_NOTE] if args.quick else []
        append_section(title, lines, [*quick, *notes], doc=args.doc)


def write_json(args: argparse.Namespace, figures: Mapping[str, Any]) -> None:
    """``figures`` (plus the command's settings) to ``--json``, when given."""
    if args.json is None:
        return
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"settings": settings, "machine": machine(), "figures": figures}
    args.json.write_text(json.dumps(record, indent=2, default=_finite) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON: {value!r}")


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"1-min load {load:.2f} at the end"
    )


def command_line() -> str:
    """This process's command, as a reader would type it from the repository root."""
    return "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    )


def append_section(
    title: str, lines: list[str], notes: Sequence[str] = (), doc: Path = DOC
) -> None:
    """Record ``title`` with the date, machine, the command that ran (this process's argv) and
    ``lines`` (a table), replacing the previous run's section of the same title."""
    section = [
        "",
        f"## {title}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine()}",
        f"- command: `{command_line()}`",
        *[f"- {n}" for n in notes],
        "",
        *lines,
        "",
    ]
    write_section(title, "\n".join(section), doc=doc)


def write_section(title: str, text: str, doc: Path = DOC) -> None:
    """Put ``text`` (a section starting with ``## title``) in ``doc``: in place of the section
    with the same title (the doc keeps each benchmark's latest run), else at the end."""
    if not doc.exists():
        doc.write_text("# Performance\n\nEvery figure here comes from a command in bench/.\n")
    text_now = doc.read_text()
    heading = f"\n## {title}\n"
    start = text_now.find(heading)
    if start < 0:
        doc.write_text(text_now.rstrip("\n") + "\n" + text.rstrip("\n") + "\n")
        return
    end = text_now.find("\n## ", start + len(heading))
    rest = text_now[end:] if end >= 0 else "\n"
    doc.write_text(text_now[:start] + "\n" + text.strip("\n") + "\n" + rest)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out
