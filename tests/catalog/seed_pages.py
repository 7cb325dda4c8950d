"""A reader for the seed pages (one Segmind API page per slug), so the catalog is checked against
the source of the contract. The workspace's ../shared/seeds/ is read when it sits beside the
checkout (it is the source); a fresh clone reads the copy in tests/catalog/seeds/, which
``test_seed_copy_matches_the_source`` keeps equal to the source wherever both exist."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCE_SEEDS_DIR = Path(__file__).resolve().parents[3] / "shared" / "seeds"
COPIED_SEEDS_DIR = Path(__file__).resolve().parent / "seeds"
SEEDS_DIR = SOURCE_SEEDS_DIR if SOURCE_SEEDS_DIR.is_dir() else COPIED_SEEDS_DIR

_HEADER = re.compile(r"^([a-z0-9_]+)(required|optional)$")
_RANGE = re.compile(r"Range:\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)")
_DEFAULT = re.compile(r"Default:\s*(.*?)(?:Range:|$)")


@dataclass
class SeedParam:
    name: str
    required: bool
    type: str
    default: object = "<none>"
    minimum: float | None = None
    maximum: float | None = None
    allowed: list[str] = field(default_factory=list)
    allowed_total: int | None = None


def read_seed(slug: str) -> dict[str, SeedParam]:
    text = (SEEDS_DIR / f"{slug}.txt").read_text(encoding="utf-8")
    section = text.split("\nParameters\n", 1)[1].split("\nResponse Type", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.strip()]
    params: dict[str, SeedParam] = {}
    current: SeedParam | None = None
    for index, line in enumerate(lines):
        header = _HEADER.match(line)
        if header:
            current = SeedParam(
                name=header.group(1),
                required=header.group(2) == "required",
                type=lines[index + 1],
            )
            params[current.name] = current
            continue
        if current is None:
            continue
        if line.startswith("Default:"):
            raw = _DEFAULT.match(line)
            assert raw is not None
            current.default = json.loads(raw.group(1).strip())
            found = _RANGE.search(line)
            if found:
                current.minimum = float(found.group(1))
                current.maximum = float(found.group(2))
        elif line.startswith("Allowed values"):
            total = re.search(r"\((\d+) total\)", line)
            current.allowed_total = int(total.group(1)) if total else None
            current.allowed = re.findall(r'"([^"]*)"', lines[index + 1])
    return params


_CODE_LINE = re.compile(r"^\s*\d+(.*)$")


def read_examples(slug: str) -> list[dict[str, object]]:
    """The example request bodies of a page's code sample: its dict literals (``data = {…}``,
    ``payload = {…}``) and the keyword arguments of ``segmind.run(slug, …)``.

    The sample is Python with numbered lines; JSON spellings (``false``) are read too.
    """
    text = (SEEDS_DIR / f"{slug}.txt").read_text(encoding="utf-8")
    sample = text.split("\nAPI Endpoint\n", 1)[0]
    code = "\n".join(
        found.group(1) for line in sample.splitlines() if (found := _CODE_LINE.match(line))
    )
    bodies: list[dict[str, object]] = []
    for node in ast.walk(ast.parse(code)):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Dict)
            and any(isinstance(t, ast.Name) and t.id in ("data", "payload") for t in node.targets)
        ):
            bodies.append(_literal(node.value))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "run"
            and node.keywords
        ):
            bodies.append({k.arg: _literal(k.value) for k in node.keywords if k.arg})
    return bodies


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name):  # JSON spellings inside Python
        return {"true": True, "false": False, "null": None}[node.id]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True) if k}
    return ast.literal_eval(node)
