"""Runs bench/ scripts at their smallest settings, two at a time, for test_bench_smoke.py.

Most of a smoke run is single-threaded (Python and torch imports, server start-ups), so two
lanes fill a 2-core machine and halve the module's wall time. Each script runs as a person
would run it (``python bench/X.py --quick``), its section and figures written under its own
folder, with one torch thread per process so that a script and the servers it starts do not
oversubscribe the cores. Scripts that make git worktrees share a lane: one at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Bench:
    """One script's smoke run, and what its section in the doc is called."""

    script: str
    title: str
    args: tuple[str, ...] = ()
    cache: bool = True
    """Pass ``--cache-dir`` (the session's tiny-preset cache, built once)."""
    cost_s: float = 10.0
    """Rough CPU seconds of the run alone (its servers included): balances the lanes."""
    git: bool = False
    """Makes git worktrees of a baseline revision (these run in one lane, one at a time)."""
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 240.0


@dataclass
class Outcome:
    """How one script's run ended, and where it wrote."""

    bench: Bench
    folder: Path
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    """Why it has no exit status: a timeout, or the run was abandoned."""
    wall_s: float = 0.0
    worktrees_before: frozenset[str] = frozenset()
    worktrees_after: frozenset[str] = frozenset()

    @property
    def doc(self) -> Path:
        return self.folder / "PERFORMANCE.md"

    @property
    def figures_path(self) -> Path:
        return self.folder / "figures.json"

    def describe(self) -> str:
        return (
            f"bench/{self.bench.script}: exit {self.returncode} {self.error or ''} after "
            f"{self.wall_s:.0f} s\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n"
            f"{self.stderr[-3000:]}"
        )

    def figures(self) -> dict[str, Any]:
        record = json.loads(self.figures_path.read_text())
        assert record["settings"]["quick"] is True
        return dict(record["figures"])


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    # Torch's worker threads spin while they wait: with a script and its servers side by side
    # on two cores, two threads each cost several times the work (the engine benchmark: 77 s of
    # CPU with two threads under load, 15 s with one).
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def worktrees() -> frozenset[str]:
    """The repository's git worktrees (a baseline's checkout must be gone after its run)."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    )
    return frozenset(line for line in done.stdout.splitlines() if line.startswith("worktree "))


class SmokeRunner:
    """Starts every given run at once, in two lanes; ``outcome`` waits for one of them."""

    def __init__(self, benches: Mapping[str, Bench], folder: Path, cache: Path) -> None:
        self._benches = dict(benches)
        self._folder = folder
        self._cache = cache
        self._outcomes: dict[str, Outcome] = {}
        self._done = {name: threading.Event() for name in benches}
        self._stop = threading.Event()
        self._running: dict[str, subprocess.Popen[str]] = {}
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._lane, args=(lane,), name=f"bench-lane-{i}", daemon=True)
            for i, lane in enumerate(self._lanes())
        ]
        for thread in self._threads:
            thread.start()

    def _lanes(self) -> list[list[str]]:
        """Two lists of names balanced by cost (git runs all in the first; then the costliest
        first to the lighter lane), each run in the given order."""
        lane_of: dict[str, int] = {}
        costs = [0.0, 0.0]
        by_cost = sorted(self._benches.items(), key=lambda item: (not item[1].git, -item[1].cost_s))
        for name, bench in by_cost:
            lane = 0 if bench.git else min((0, 1), key=lambda i: costs[i])
            lane_of[name] = lane
            costs[lane] += bench.cost_s
        return [[name for name in self._benches if lane_of[name] == lane] for lane in (0, 1)]

    def outcome(self, name: str) -> Outcome:
        bench = self._benches[name]
        # Its own time, plus the runs ahead of it in its lane at most.
        if not self._done[name].wait(sum(b.timeout_s for b in self._benches.values())):
            raise AssertionError(f"bench/{bench.script} never finished")
        return self._outcomes[name]

    def close(self) -> None:
        """Abandon runs not started, interrupt running ones (their servers stop cleanly)."""
        self._stop.set()
        for signal_number, wait_s in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
            with self._lock:
                running = list(self._running.values())
            for process in running:
                _signal_group(process, signal_number)
            for thread in self._threads:
                thread.join(wait_s)

    def _lane(self, names: Sequence[str]) -> None:
        for name in names:
            folder = self._folder / name
            folder.mkdir(parents=True)
            outcome = Outcome(self._benches[name], folder)
            try:
                if self._stop.is_set():
                    outcome.error = "abandoned: the module stopped early"
                else:
                    self._run(name, outcome)
            except Exception as error:  # recorded for the test that reads it
                outcome.error = repr(error)
            finally:
                self._outcomes[name] = outcome
                self._done[name].set()

    def _run(self, name: str, outcome: Outcome) -> None:
        bench = outcome.bench
        command = [sys.executable, f"bench/{bench.script}", "--quick"]
        command += ["--doc", str(outcome.doc), "--json", str(outcome.figures_path)]
        if bench.cache:
            command += ["--cache-dir", str(self._cache)]
        command += bench.args
        if bench.git:
            outcome.worktrees_before = worktrees()
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=bench_env(**bench.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its servers too can be killed as one group
        )
        with self._lock:
            self._running[name] = process
        try:
            outcome.stdout, outcome.stderr = process.communicate(timeout=bench.timeout_s)
            outcome.returncode = process.returncode
        except subprocess.TimeoutExpired:
            outcome.error = f"timed out after {bench.timeout_s:.0f} s"
            outcome.stdout, outcome.stderr = _interrupt(process)
        finally:
            with self._lock:
                self._running.pop(name, None)
            outcome.wall_s = time.monotonic() - started
        if bench.git:
            outcome.worktrees_after = worktrees()


def _interrupt(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Ctrl-C (the script's ``finally`` blocks stop its servers), then kill what is left."""
    _signal_group(process, signal.SIGINT)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        return process.communicate()


def _signal_group(process: subprocess.Popen[str], signal_number: int) -> None:
    """``signal_number`` to the script (SIGINT) or to its whole session (SIGKILL)."""
    try:
        if signal_number == signal.SIGKILL:
            os.killpg(process.pid, signal_number)
        else:
            process.send_signal(signal_number)
    except ProcessLookupError:
        pass
