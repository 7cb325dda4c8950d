"""bench/gpu_verify.py's machinery: the plan, one run's state and results file, stages and their
budgets, and the watchdog that always ends the process at the deadline.

A GPU lease is short and may be cut off, so the run keeps what it measured: stages run in order,
each appends one JSON line the moment it ends (flushed and synced), each has its own budget, and
a watchdog (or SIGTERM) writes the running stage's partial line and the rest's skip lines and
ends the process, whatever fails on the way out.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESERVE_S = 3.0
"""Seconds kept back from the global budget for the last lines and the exit."""
STOP_LOCK_WAIT_S = 5.0
"""How long the way out waits for a results line being written; then it writes anyway."""
GIB = 2**30
Size = tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """What one run measures: the GPU plan, or the dry run's small CPU version of it."""

    weights: str
    device: str
    matmul_sizes: tuple[int, ...]
    cfg_cases: tuple[tuple[Size, int], ...]
    """(size, steps) rows run with CFG pairing on and off: 1024² at 50 steps is the anchor."""
    fast_sizes: tuple[Size, ...]
    fast_steps: int
    vae_sizes: tuple[Size, ...]
    batch_sizes: tuple[Size, ...]
    batch: int
    fp8_size: Size
    fp8_steps: int
    warm_up: bool = True
    """Run each case once at 2 steps before timing it (kernel selection, first-call costs)."""
    q21_size: Size = (1024, 1024)
    q21_steps: int = 40
    edit_size: Size = (1024, 1024)
    edit_steps: int = 40
    encoder_tokens: int = 200
    """Prompt length the encoders stage encodes (a long prompt; the template adds ~34)."""
    full_encoders: bool = True
    """Real-size 7B/8B text encoders (random, on the device); the dry run uses the tiny ones."""
    compile_backend: str | None = None
    """None: torch.compile's own (inductor). The dry run may take "aot_eager": it traces and
    counts as on a GPU without minutes of C++ code generation on a CPU."""
    budget_scale: float = 1.0
    """Stage budgets and the default deadline are multiplied by this: the GPU budgets are sized
    for an H200; a dry run on a small shared CPU is slower at everything (imports included)."""


GPU_PLAN = Plan(
    weights="random-full",
    device="cuda",
    matmul_sizes=(4096, 8192),
    cfg_cases=(((1024, 1024), 50), ((1328, 1328), 20)),
    fast_sizes=((1024, 1024), (1328, 1328)),
    fast_steps=8,
    vae_sizes=((1024, 1024), (1328, 1328)),
    batch_sizes=((1024, 1024),),
    batch=4,
    fp8_size=(1024, 1024),
    fp8_steps=8,
)
DRY_PLAN = Plan(
    weights="tiny",
    device="cpu",
    matmul_sizes=(256,),
    cfg_cases=(((128, 128), 2), ((160, 160), 2)),
    # 256x256 is the size the tiny preset's compile warm-up runs at (its 1:1 size).
    fast_sizes=((128, 128), (256, 256)),
    fast_steps=2,
    # Tiling splits only above 256 pixels: here the switch runs, on the GPU (1328²) it splits.
    vae_sizes=((128, 128),),
    batch_sizes=((128, 128),),
    batch=4,
    fp8_size=(128, 128),
    fp8_steps=2,
    warm_up=False,
    q21_size=(128, 128),  # a multiple of 32, as 2.1's pipeline needs
    q21_steps=2,
    edit_size=(128, 128),
    edit_steps=2,
    encoder_tokens=32,
    full_encoders=False,
    compile_backend="aot_eager",
    budget_scale=4.0,
)


def _tidy(value: Any) -> Any:
    """Floats to 4 significant digits (timings are not more precise), recursively."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _tidy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tidy(v) for v in value]
    return value


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def is_oom(error: BaseException) -> bool:
    """A CUDA out-of-memory, raw or as the engine's InferenceError."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "OutOfMemoryError" or "out of memory" in str(seen).lower():
            return True
        seen = seen.__cause__
    return False


@dataclass
class Stage:
    """One stage while it runs: its JSON record (filled as it goes) and its deadline."""

    name: str
    record: dict[str, Any]
    started: float
    deadline: float

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def attempt(
        self, label: str, measure: Callable[[], dict[str, Any]], estimate_s: float = 0.0
    ) -> dict[str, Any] | None:
        """Run one measurement into ``runs`` (or ``not_run`` when too little time is left).

        An exception becomes the row's ``error`` (the stage goes on); an out-of-memory also
        frees the allocator's cache. Returns the row, or None when it did not start."""
        if self.left() <= estimate_s:
            self.record.setdefault("not_run", []).append(
                f"{label}: {max(self.left(), 0):.0f} s left of the stage budget, "
                f"~{estimate_s:.0f} s needed"
            )
            return None
        row: dict[str, Any] = {"label": label}
        self.record.setdefault("runs", []).append(row)
        self.record["running"] = label  # what a line written at the deadline was doing
        started = time.perf_counter()
        try:
            row.update(measure())
        except Exception as error:
            row["error"] = error_text(error)
            if is_oom(error):
                row["oom"] = True
            free_memory()
        row["wall_s"] = time.perf_counter() - started
        del self.record["running"]
        return row


@dataclass(frozen=True)
class StageSpec:
    """A stage: its name, what it measures, its time budget and the least it needs to start."""

    name: str
    title: str
    budget_s: float
    min_s: float
    run: Callable[[Run, Stage], None]


class Run:
    """One verification run: the plan, the results file, the shared engine, the deadline."""

    def __init__(
        self,
        plan: Plan,
        out: Path,
        budget_s: float,
        cache_dir: Path,
        *,
        dry_run: bool,
        runs: int = 1,
    ) -> None:
        self.plan = plan
        self.out = out
        self.budget_s = budget_s
        self.started = time.perf_counter()
        self.deadline = self.started + budget_s
        self.cache_dir = cache_dir
        self.dry_run = dry_run
        self.runs = runs
        self.peak_flops: float | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.shared: Any = None
        self.shared_bytes: int | None = None
        self.shared_builds = 0
        """How often this run built the shared engine (one build per command is the plan)."""
        self.current: Stage | None = None
        self.pending: list[str] = []
        """Stages not started yet: the watchdog writes their skip lines."""
        self._lock = threading.Lock()
        """Guards the results file and ``current``. Never taken in a signal handler: SIGTERM
        hands the way out to a thread (``stops_at_deadline``)."""
        self._torch: Any = None

    # --- device -----------------------------------------------------------------------------
    @property
    def torch(self) -> Any:
        if self._torch is None:
            import torch

            self._torch = torch
        return self._torch

    @property
    def cuda(self) -> bool:
        return bool(self.plan.device == "cuda" and self.torch.cuda.is_available())

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def memory(self) -> dict[str, float | None]:
        """GPU memory now and at peak since the last reset (GiB); the process RSS peak."""
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        if not self.cuda:
            return {"gpu_allocated_gib": None, "gpu_peak_gib": None, "rss_peak_gib": rss_gib}
        cuda = self.torch.cuda
        return {
            "gpu_allocated_gib": cuda.memory_allocated() / GIB,
            "gpu_peak_gib": cuda.max_memory_allocated() / GIB,
            "rss_peak_gib": rss_gib,
        }

    # --- engines ------------------------------------------------------------------------------
    def engine_config(self, **switches: Any) -> Any:
        from qwenserve.runtime import EngineConfig

        return EngineConfig(
            weights=self.plan.weights,
            cache_dir=self.cache_dir,
            device=self.plan.device,
            resident_models=1,
            **switches,
        )

    def engine(self) -> Any:
        """The bf16 engine the core stages share, built once per command (a 41 GB model).

        CFG pairing is on explicitly: auto resolves to off on CUDA, and the cfg stage switches
        it off per row on this same engine (``gpu_verify_measure.cfg_pairing``)."""
        if self.shared is None:
            from qwenserve.runtime import Engine

            self.shared = Engine(self.engine_config(cfg_batch=True))
            self.shared_builds += 1
            self.shared.load("qwen-image")
            self.sync()
            if self.cuda:
                self.shared_bytes = int(self.torch.cuda.memory_allocated())
        return self.shared

    def release_shared(self) -> None:
        self.shared = None
        free_memory()

    def other_engine(self, **switches: Any) -> Any:
        """An engine with other switches; the shared one is released first when both would
        not fit (an 80 GB card holds one random-full pipeline and its activations), so call
        it only where no later stage of the command needs the shared engine."""
        from qwenserve.runtime import Engine

        if self.cuda and self.shared is not None:
            free_bytes, _total = self.torch.cuda.mem_get_info()
            if free_bytes < 1.4 * (self.shared_bytes or 45 * GIB):
                self.release_shared()
        return Engine(self.engine_config(**switches))

    # --- the results file ---------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_tidy(record), sort_keys=False)
        with self.out.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        print(line, flush=True)

    def base_record(self, spec: StageSpec, index: int) -> dict[str, Any]:
        return {
            "stage": spec.name,
            "n": index,
            "title": spec.title,
            "status": "ok",
            "at": _now(),
            "dry_run": self.dry_run,
            "device": self.plan.device,
            "budget_s": spec.budget_s * self.plan.budget_scale,
        }

    def global_left(self) -> float:
        return self.deadline - RESERVE_S - time.perf_counter()

    def stop(self, reason: str) -> None:
        """Write the running stage's partial line and every pending stage's skip line, then
        end the process at once (the watchdog's and SIGTERM's way out). It always ends the
        process: a line that cannot be written (a full disk, a lock held too long) is lost,
        the exit is not."""
        try:
            # Held until the exit; after the wait, write without it rather than never.
            self._lock.acquire(timeout=STOP_LOCK_WAIT_S)
            stage, self.current = self.current, None
            if stage is not None:
                stage.record.update(
                    status="error",
                    error=f"{reason} during this stage; stopped",
                    wall_s=time.perf_counter() - stage.started,
                )
                self.write(stage.record)
            pending, self.pending = self.pending, []
            for name in pending:
                self.write({"stage": name, "status": "skipped", "skipped": reason})
        except BaseException as error:  # the exit below must happen whatever this was
            print(f"gpu_verify: while stopping: {error_text(error)}", file=sys.stderr, flush=True)
        finally:
            try:
                sys.stdout.flush()
            finally:
                os._exit(3)


def free_memory() -> None:
    """Drop unreachable engines and return cached blocks, so the next stage starts clean."""
    gc.collect()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def run_stages(run: Run, specs: Sequence[StageSpec], selected: set[str] | None = None) -> None:
    """Run ``specs`` in order, one JSON line each, whatever each one does."""
    run.pending = [spec.name for spec in specs]
    for index, spec in enumerate(specs, start=1):
        record = run.base_record(spec, index)
        skip = None
        if selected is not None and spec.name not in selected:
            skip = "not selected (--stages)"
        elif spec.budget_s <= 0:
            skip = "its stage budget is 0"
        elif run.global_left() < spec.min_s * run.plan.budget_scale:
            skip = (
                f"global budget: {max(run.global_left(), 0):.0f} s left, the stage needs at "
                f"least {spec.min_s * run.plan.budget_scale:.0f} s"
            )
        if skip is not None:
            record.update(status="skipped", skipped=skip)
            with run._lock:
                run.write(record)
                run.pending.remove(spec.name)
            continue
        now = time.perf_counter()
        budget_s = spec.budget_s * run.plan.budget_scale
        stage = Stage(spec.name, record, now, min(now + budget_s, run.deadline - RESERVE_S))
        with run._lock:
            run.current = stage
            run.pending.remove(spec.name)
        try:
            spec.run(run, stage)
            if stage.record.get("not_run"):
                record["status"] = "partial"
            if any("error" in row for row in record.get("runs", [])):
                record["status"] = "partial"
        except Exception as error:
            record.update(status="error", error=error_text(error))
            if is_oom(error):
                record["oom"] = True
        record["wall_s"] = time.perf_counter() - stage.started
        record["shared_engine_builds"] = run.shared_builds
        with run._lock:
            if run.current is not stage:  # the watchdog wrote this stage's line and stopped
                return
            run.current = None
            run.write(record)
        run.results[spec.name] = record
        free_memory()  # what the stage dropped; the shared engine stays (run.shared holds it)


@contextmanager
def stops_at_deadline(run: Run) -> Iterator[None]:
    """A watchdog at the global deadline and a SIGTERM handler, both ending the run cleanly.

    The handler only starts a thread that stops the run: a signal handler runs on the main
    thread between two bytecodes, possibly while that thread holds the results lock, so taking
    the lock there could wait forever."""
    timer = threading.Timer(
        max(run.deadline - time.perf_counter(), 0.0),
        run.stop,
        args=(f"global deadline ({run.budget_s:.0f} s) reached",),
    )
    timer.daemon = True
    timer.start()

    def on_sigterm(*_: Any) -> None:
        threading.Thread(target=run.stop, args=("terminated (SIGTERM)",), daemon=True).start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
