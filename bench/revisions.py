"""Serving an earlier revision beside this checkout: git worktrees of the revisions, each run
from its own ``src`` (``PYTHONPATH``), so two revisions are measured side by side in one run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Side:
    """One revision to serve: its name in the table and its source folder."""

    name: str
    src: Path

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.src), "QWENSERVE_LOG_LEVEL": "WARNING"}

    def create_key(self, data_dir: Path, cache_dir: Path) -> str:
        """A key made by this side's own code (a newer CLI would migrate an older store)."""
        env = {
            **os.environ,
            **self.env(),
            "QWENSERVE_DATA_DIR": str(data_dir),
            "QWENSERVE_CACHE_DIR": str(cache_dir),
        }
        command = ["keys", "create", "--credits", "1e6", "--rpm", "0"]
        out = subprocess.run(
            [sys.executable, "-m", "qwenserve.cli.main", *command],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().splitlines()[-1]


def short(rev: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@contextmanager
def sides(tmp: Path, baseline: str, against: str | None) -> Iterator[list[Side]]:
    """The baseline revision and ``against`` (else this checkout), checked out under ``tmp``
    for as long as the block runs."""
    revisions = [("baseline", short(baseline))]
    if against is not None:
        revisions.append(("measured", short(against)))
    checkouts: list[Path] = []
    try:
        for name, rev in revisions:
            checkout = tmp / name
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(checkout), rev],
                check=True,
            )
            checkouts.append(checkout)
        measured = revisions[1][1] if against is not None else f"this checkout ({short('HEAD')})"
        yield [
            Side(f"baseline {revisions[0][1]}", checkouts[0] / "src"),
            Side(measured, checkouts[1] / "src" if against is not None else ROOT / "src"),
        ]
    finally:
        for checkout in checkouts:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)],
                check=False,
            )
