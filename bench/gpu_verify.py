"""GPU proof in one command: the engine's fast paths measured on one H100/H200 within 8 minutes.

    PYTHONPATH=src python bench/gpu_verify.py [--out gpu_verify.jsonl] [--budget-s 480]
        [--stages env,cfg,...] [--stage-budget compile=240] [--runs 1] [--dry-run]
    PYTHONPATH=src python bench/gpu_verify.py --report gpu_verify.jsonl [--no-write]

A GPU lease is short and may be cut off, so the run is built to keep what it measured: stages
run in order, each appends one JSON line to ``--out`` the moment it ends (flushed and synced),
each has its own time budget (``STAGES``; cases it could not start are listed in ``not_run``)
and a stage whose budget or the global budget (``--budget-s``) is gone writes a line with
``"skipped": why``. A watchdog writes the running stage's partial line and the skipped lines of
the rest at the global deadline (or on SIGTERM) and ends the process, so the run always stops
inside its budget. An exception in a stage becomes its ``"error"`` line and the next stage
runs; a CUDA out-of-memory frees the allocator's cache first. Memory is freed between stages.

Stages: env (versions, device, measured bf16 matmul peak), pytest (``-m gpu``), build
(random-full transformer), cfg (qwen-image, true CFG, 20 steps, three sizes, ``cfg_batch`` on
and off, attention backends), fast (qwen-image-fast, 8 steps, Lightning fused and unfused,
against 1.2 s per image), vae (decode peak memory, batch 1 and 4, tiled and untiled), batch (a
batch of 4 vs 4 single calls), fp8 (each mode in ``QUANTIZE_MODES``), qwen21 (Qwen-Image 2.1
at 1024², 40 steps, an edit with two references, the 4-step fast slug:
bench/gpu_verify_21.py), compile (cold warm-up,
steady step, recompiles after a new prompt length and a new size). Every timing comes with the
FLOP limit (``bench/step_timing.py``) at the measured matmul peak: ``share_of_peak`` = limit /
measured (1.0 = running at the matmul peak).

``--dry-run`` runs every stage on the CPU with the tiny preset at small sizes and few steps, so
the script itself is proven before GPU minutes are spent on it. ``--report FILE`` renders a
results file as the "GPU proof" section of docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_verify_21 import stage_qwen21  # noqa: E402
from bench.step_timing import StepClock, TransformerShape, image_tokens  # noqa: E402

QUANTIZE_MODES = ("fp8-memory", "fp8-speed", "fp8")
"""The fp8 modes the fp8 stage tries, each on its own engine: "fp8-memory" (weight-only) and
"fp8-speed" (dynamic activations, row-wise scales) are the names being introduced; "fp8" is
today's name of the weight-only mode. A name the engine refuses gets a line saying so."""
SPEC_PEAK_TFLOPS = 790.0
"""Dense bf16 TFLOP/s an H100/H200 achieves in practice (gpu-facts.md): the second yardstick."""
FAST_TARGET_S_PER_IMAGE = 1.2
"""The issue's target for an 8-step Lightning image."""
PROMPT = "a lighthouse on a cliff at dusk, waves below, oil painting"
LONG_PROMPT = PROMPT + (
    ", seen from the sea through light rain, a fishing boat in the foreground, gulls, warm light"
    " in the lantern room, dramatic clouds, a path winding up the cliff, grass bent by the wind"
)
RESERVE_S = 3.0
"""Seconds kept back from the global budget for the last lines and the exit."""
GIB = 2**30


@dataclass(frozen=True)
class Plan:
    """What one run measures: the GPU plan, or the dry run's small CPU version of it."""

    weights: str
    device: str
    matmul_sizes: tuple[int, ...]
    cfg_sizes: tuple[tuple[int, int], ...]
    cfg_steps: int
    fast_sizes: tuple[tuple[int, int], ...]
    fast_steps: int
    vae_size: tuple[int, int]
    batch_sizes: tuple[tuple[int, int], ...]
    batch: int
    fp8_size: tuple[int, int]
    fp8_steps: int
    warm_up: bool = True
    """Run each case once at 2 steps before timing it (kernel selection, first-call costs)."""
    q21_size: tuple[int, int] = (1024, 1024)
    q21_steps: int = 40
    """Qwen-Image 2.1's stage (bench/gpu_verify_21.py): its size and steps."""


GPU_PLAN = Plan(
    weights="random-full",
    device="cuda",
    matmul_sizes=(4096, 8192, 16384),
    cfg_sizes=((1024, 1024), (1328, 1328), (1664, 928)),
    cfg_steps=20,
    fast_sizes=((1024, 1024), (1328, 1328)),
    fast_steps=8,
    vae_size=(1328, 1328),
    batch_sizes=((1024, 1024), (512, 512)),
    batch=4,
    fp8_size=(1024, 1024),
    fp8_steps=8,
)
DRY_PLAN = Plan(
    weights="tiny",
    device="cpu",
    matmul_sizes=(256, 512),
    cfg_sizes=((128, 128), (160, 160), (224, 128)),
    cfg_steps=2,
    # 256x256 is the size the tiny preset's compile warm-up runs at (its 1:1 size).
    fast_sizes=((128, 128), (256, 256)),
    fast_steps=2,
    # Tiling splits only above 256 pixels: here the switch runs, on the GPU (1328²) it splits.
    vae_size=(128, 128),
    batch_sizes=((128, 128),),
    batch=4,
    fp8_size=(128, 128),
    fp8_steps=2,
    warm_up=False,
    q21_size=(128, 128),  # a multiple of 32, as 2.1's pipeline needs
    q21_steps=2,
)


# --- the run and its stages --------------------------------------------------------------------
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


def _error_text(error: BaseException) -> str:
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
            row["error"] = _error_text(error)
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
        self.current: Stage | None = None
        self.pending: list[str] = []
        """Stages not started yet: the watchdog writes their skip lines."""
        self._lock = threading.Lock()
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
        """The bf16 engine stages 3-7 share (one build of a 41 GB model, not five)."""
        if self.shared is None:
            from qwenserve.runtime import Engine

            self.shared = Engine(self.engine_config())
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
        not fit (an 80 GB card holds one random-full pipeline and its activations)."""
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
            "budget_s": spec.budget_s,
        }

    def global_left(self) -> float:
        return self.deadline - RESERVE_S - time.perf_counter()

    def stop(self, reason: str) -> None:
        """Write the running stage's partial line and every pending stage's skip line, then
        end the process at once (the watchdog's and SIGTERM's way out)."""
        with self._lock:
            stage = self.current
            if stage is not None:
                stage.record.update(
                    status="error",
                    error=f"{reason} during this stage; stopped",
                    wall_s=time.perf_counter() - stage.started,
                )
                self.write(stage.record)
                self.current = None
            for name in self.pending:
                self.write({"stage": name, "status": "skipped", "skipped": reason})
            self.pending = []
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
        elif run.global_left() < spec.min_s:
            skip = (
                f"global budget: {max(run.global_left(), 0):.0f} s left, the stage needs at "
                f"least {spec.min_s:.0f} s"
            )
        if skip is not None:
            record.update(status="skipped", skipped=skip)
            with run._lock:
                run.write(record)
                run.pending.remove(spec.name)
            continue
        now = time.perf_counter()
        stage = Stage(spec.name, record, now, min(now + spec.budget_s, run.deadline - RESERVE_S))
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
            record.update(status="error", error=_error_text(error))
            if is_oom(error):
                record["oom"] = True
        record["wall_s"] = time.perf_counter() - stage.started
        with run._lock:
            if run.current is not stage:  # the watchdog wrote this stage's line and stopped
                return
            run.current = None
            run.write(record)
        run.results[spec.name] = record
        free_memory()  # what the stage dropped; the shared engine stays (run.shared holds it)


# --- measuring helpers --------------------------------------------------------------------------
def request_for(slug: str, size: tuple[int, int], steps: int, **body: Any) -> Any:
    """A request validated as the API would, then set to exactly ``size`` (the public
    contract takes an aspect ratio; the benchmark needs exact sizes)."""
    from qwenserve.catalog import validate_request

    fields: dict[str, Any] = {"prompt": PROMPT, "steps": steps, "seed": 1, **body}
    request = validate_request(slug, fields)
    return dataclasses.replace(request, width=size[0], height=size[1], aspect_ratio=None)


def flop_fields(
    run: Run, engine: Any, request: Any, s_per_step: float, batch: int = 1
) -> dict[str, Any]:
    """The step's FLOPs (from the tokens this exact call uses) and its share of the peaks."""
    prepared = engine.prepare_call(request)
    shape = TransformerShape.of(prepared.pipeline.transformer)
    image = image_tokens(prepared.size.generate_width, prepared.size.generate_height)
    texts = [prepared.kwargs["prompt_embeds"].shape[1]]
    negative = prepared.kwargs.get("negative_prompt_embeds")
    if prepared.kwargs.get("true_cfg_scale", 1.0) > 1.0 and negative is not None:
        texts.append(negative.shape[1])
    flop = batch * sum(shape.forward_flop(image, text) for text in texts)
    fields: dict[str, Any] = {
        "image_tokens": image,
        "text_tokens": texts,
        "forwards_per_step": batch * len(texts),
        "tflop_per_step": flop / 1e12,
        "share_of_spec": flop / (SPEC_PEAK_TFLOPS * 1e12) / s_per_step,
    }
    if run.peak_flops:
        fields["limit_s_per_step"] = flop / run.peak_flops
        fields["share_of_peak"] = flop / run.peak_flops / s_per_step
    return fields


def timed(run: Run, engine: Any, request: Any, *, warm: bool = True) -> dict[str, Any]:
    """One warmed-up request: median seconds per step, seconds per image, and its FLOP limit."""
    if warm and run.plan.warm_up:
        engine.generate(dataclasses.replace(request, steps=2))
    per_step: list[float] = []
    per_image: list[float] = []
    for _ in range(run.runs):
        clock = StepClock(run.sync)
        started = clock.start()
        engine.generate(request, on_step=clock)
        run.sync()
        per_image.append(time.perf_counter() - started)
        per_step.append(clock.median_step_s())
    s_per_step = sorted(per_step)[len(per_step) // 2]
    return {
        "steps": request.steps,
        "s_per_step": s_per_step,
        "s_per_image": sorted(per_image)[len(per_image) // 2],
        **flop_fields(run, engine, request, s_per_step),
    }


def label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- 1. environment and the matmul peak ---------------------------------------------------------
def stage_env(run: Run, stage: Stage) -> None:
    torch = run.torch
    record = stage.record
    record.update(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        diffusers=_version("diffusers"),
        transformers=_version("transformers"),
        peft=_version("peft"),
        torchao=_version("torchao"),
        cpu_count=os.cpu_count(),
        cuda_available=torch.cuda.is_available(),
    )
    if run.cuda:
        properties = torch.cuda.get_device_properties(0)
        record.update(
            device_name=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            memory_total_gib=properties.total_memory / GIB,
        )
    else:
        record.update(device_name=platform.processor() or platform.machine())
    dtype = torch.bfloat16 if run.cuda else torch.float32
    device = "cuda" if run.cuda else "cpu"
    for n in run.plan.matmul_sizes:

        def measure(n: int = n) -> dict[str, Any]:
            return _matmul(run, n, dtype, device)

        stage.attempt(f"matmul {n}", measure, 1.0)
    measured = [row["tflops"] for row in record.get("runs", []) if "tflops" in row]
    record["dtype"] = str(dtype).removeprefix("torch.")
    record["peak_tflops"] = max(measured) if measured else None
    record["spec_peak_tflops"] = SPEC_PEAK_TFLOPS
    run.peak_flops = max(measured) * 1e12 if measured else SPEC_PEAK_TFLOPS * 1e12
    record["peak_used"] = "measured" if measured else "spec"


def _matmul(run: Run, n: int, dtype: Any, device: str) -> dict[str, Any]:
    """Dense n³ matmuls for ~0.5 s (CUDA events on a GPU), after a warm-up."""
    torch = run.torch
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    flop = 2.0 * n**3
    for _ in range(3):
        torch.matmul(a, b, out=c)
    run.sync()
    started = time.perf_counter()
    torch.matmul(a, b, out=c)
    run.sync()
    once_s = max(time.perf_counter() - started, 1e-6)
    iterations = max(3, min(500, int(0.5 / once_s)))
    if run.cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iterations):
            torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize()
        seconds = begin.elapsed_time(end) / 1000
    else:
        started = time.perf_counter()
        for _ in range(iterations):
            torch.matmul(a, b, out=c)
        seconds = time.perf_counter() - started
    return {"n": n, "iterations": iterations, "tflops": flop * iterations / seconds / 1e12}


# --- 2. pytest -m gpu ---------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """Test files holding ``@pytest.mark.gpu`` tests. Only these are collected: the other
    test modules import the server stack (fastapi, redis, ...), which the GPU machine lacks."""
    found = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if "pytest.mark.gpu" in path.read_text():
            found.append(str(path.relative_to(ROOT)))
    return found


def stage_pytest(run: Run, stage: Stage) -> None:
    files = gpu_test_files()
    record = stage.record
    record["files"] = files
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "junit.xml"
        command = [
            sys.executable,
            *("-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider"),
            f"--junitxml={report}",
            *files,
        ]
        record["command"] = " ".join(["python", *command[1:4], "gpu", *files])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        timeout_s = max(stage.left(), 1.0)
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
            )
            output, record["returncode"] = done.stdout + done.stderr, done.returncode
            record["timed_out"] = False
        except subprocess.TimeoutExpired as expired:
            raw = (expired.stdout or b"") + (expired.stderr or b"")
            output = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            record.update(returncode=None, timed_out=True)
        record["duration_s"] = time.perf_counter() - started
        record["tail"] = output.strip().splitlines()[-8:]
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed: list[str] = []
        if report.exists():
            tree = ElementTree.parse(report)
            for suite in tree.iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
            for case in tree.iter("testcase"):
                for outcome in ("failure", "error"):
                    problem = case.find(outcome)
                    if problem is not None:
                        message = (problem.get("message") or "").splitlines()[:1]
                        failed.append(f"{case.get('name')}: {outcome}: {''.join(message)[:200]}")
        if not report.exists():  # killed at its timeout: count the verbose lines it printed
            outcomes = re.findall(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED)", output)
            counts = {
                "tests": len(outcomes),
                "failures": outcomes.count("FAILED"),
                "errors": outcomes.count("ERROR"),
                "skipped": outcomes.count("SKIPPED"),
            }
            failed = [line for line in output.splitlines() if re.search(r"::\S+ FAILED", line)]
        record.update(
            collected=counts["tests"],
            passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            failed=counts["failures"],
            errors=counts["errors"],
            skipped_tests=counts["skipped"],  # "skipped" alone is a skipped stage's reason
            failures=failed,
        )
    if record["timed_out"] or record["returncode"] not in (0, 5):  # 5: nothing collected
        record["status"] = "partial"


# --- 3. building the random-full transformer ----------------------------------------------------
def stage_build(run: Run, stage: Stage) -> None:
    free_memory()
    started = time.perf_counter()
    engine = run.engine()
    record = stage.record
    record["weights"] = run.plan.weights
    record["build_s"] = time.perf_counter() - started
    transformer = engine.prepare_call(request_for("qwen-image", (256, 256), 2)).pipeline.transformer
    record["transformer_parameters_b"] = sum(p.numel() for p in transformer.parameters()) / 1e9
    record["transformer_shape"] = dataclasses.asdict(TransformerShape.of(transformer))
    record.update(run.memory())


# --- 4. qwen-image, true CFG: cfg_batch on and off, attention backends --------------------------
def stage_cfg(run: Run, stage: Stage) -> None:
    plan = run.plan
    record = stage.record
    record["slug"], record["guidance"] = "qwen-image", 4.0
    record["attention"] = {"available": attention_backends(run)}
    engines: list[tuple[bool, Callable[[], Any]]] = [
        (True, run.engine),
        (False, lambda: run.other_engine(cfg_batch=False)),
    ]
    build_s = float(run.results.get("build", {}).get("build_s") or 0.0)
    last_s = 0.0
    for cfg_batch, make in engines:
        if stage.left() <= build_s + last_s:
            record.setdefault("not_run", []).append(f"cfg_batch={cfg_batch}: stage budget")
            continue
        engine = make()
        for size in plan.cfg_sizes:
            request = request_for("qwen-image", size, plan.cfg_steps, guidance=4.0)

            def measure(
                request: Any = request, engine: Any = engine, cfg_batch: bool = cfg_batch
            ) -> dict[str, Any]:
                return {"cfg_batch": cfg_batch, **timed(run, engine, request)}

            row = stage.attempt(f"{label(size)} cfg_batch={'on' if cfg_batch else 'off'}", measure)
            last_s = row["wall_s"] if row else last_s
        first = request_for("qwen-image", plan.cfg_sizes[0], 2, guidance=4.0)
        record["attention"][f"sdpa_ops_cfg_batch_{'on' if cfg_batch else 'off'}"] = sdpa_ops(
            run, engine, first
        )
        del engine
    free_memory()


def attention_backends(run: Run) -> dict[str, Any]:
    """What attention can run here: torch's SDPA switches and diffusers' backends whose
    requirements are met (a backend whose check raises is not usable)."""
    torch = run.torch
    found: dict[str, Any] = {
        "sdpa_flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "sdpa_mem_efficient_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "sdpa_cudnn_enabled": torch.backends.cuda.cudnn_sdp_enabled(),
        "sdpa_math_enabled": torch.backends.cuda.math_sdp_enabled(),
        "packages": {
            name: _version(name)
            for name in ("flash-attn", "flash-attn-3", "sageattention", "xformers", "kernels")
            if _version(name)
        },
    }
    try:
        from diffusers.models import attention_dispatch as dispatch

        usable = []
        for backend in dispatch.AttentionBackendName:
            try:
                dispatch._check_attention_backend_requirements(backend)
            except Exception:
                continue
            usable.append(backend.value)
        found["diffusers_usable"] = usable
    except Exception as error:  # private API: report, do not fail the stage
        found["diffusers_usable"] = _error_text(error)
    return found


def sdpa_ops(run: Run, engine: Any, request: Any) -> dict[str, int] | str:
    """Which aten attention kernels one 2-step call ran (flash, efficient, cuDNN or math),
    from the profiler: the CFG pair's explicit mask keeps SDPA off the flash kernel."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            engine.generate(request)
    except Exception as error:
        return _error_text(error)
    ops: dict[str, int] = {}
    for event in profiler.key_averages():
        if re.search(r"scaled_dot_product|flash_attention|efficient_attention", event.key):
            ops[event.key] = int(event.count)
    return ops


# --- 5. qwen-image-fast: Lightning fused and unfused --------------------------------------------
def stage_fast(run: Run, stage: Stage) -> None:
    plan = run.plan
    record = stage.record
    record["slug"], record["target_s_per_image"] = "qwen-image-fast", FAST_TARGET_S_PER_IMAGE
    build_s = float(run.results.get("build", {}).get("build_s") or 0.0)
    for fused in (False, True):
        if fused and stage.left() <= build_s:
            record.setdefault("not_run", []).append("fused: stage budget")
            continue
        started = time.perf_counter()
        engine = run.other_engine(fuse_lightning=True) if fused else run.engine()
        engine.load("qwen-image-fast")  # loads (and for fused, fuses) the Lightning LoRA
        record[f"load_s_{'fused' if fused else 'unfused'}"] = time.perf_counter() - started
        for size in plan.fast_sizes:
            request = request_for("qwen-image-fast", size, plan.fast_steps)

            def measure(
                request: Any = request, engine: Any = engine, fused: bool = fused
            ) -> dict[str, Any]:
                row = {"fused": fused, **timed(run, engine, request)}
                row["meets_target"] = row["s_per_image"] <= FAST_TARGET_S_PER_IMAGE
                return row

            stage.attempt(f"{label(size)} {'fused' if fused else 'unfused'}", measure)
        del engine
    free_memory()


# --- 6. VAE decode peak memory ------------------------------------------------------------------
def stage_vae(run: Run, stage: Stage) -> None:
    """Decodes random latents with the pipeline's own VAE (``pipe.vae.decode``, as the pipeline
    calls it): the engine exposes no decode of its own."""
    torch = run.torch
    width, height = run.plan.vae_size
    record = stage.record
    record["size"] = label(run.plan.vae_size)
    request = request_for("qwen-image", run.plan.vae_size, 2)
    vae = run.engine().prepare_call(request).pipeline.vae
    record["memory_measured"] = run.cuda
    for batch in (1, 4):
        for tiled in (False, True):

            def measure(batch: int = batch, tiled: bool = tiled) -> dict[str, Any]:
                latents = torch.randn(
                    batch,
                    vae.config.z_dim,
                    1,
                    height // 8,
                    width // 8,
                    dtype=vae.dtype,
                    device=vae.device,
                )
                (vae.enable_tiling if tiled else vae.disable_tiling)()
                free_memory()
                base = torch.cuda.memory_allocated() if run.cuda else 0
                run.sync()
                started = time.perf_counter()
                with torch.no_grad():
                    vae.decode(latents, return_dict=False)
                run.sync()
                row: dict[str, Any] = {
                    "batch": batch,
                    "tiled": tiled,
                    "decode_s": time.perf_counter() - started,
                }
                if run.cuda:
                    row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
                    row["peak_gib_per_image"] = row["peak_gib"] / batch
                else:
                    row["peak_gib"] = None
                return row

            stage.attempt(f"batch {batch} {'tiled' if tiled else 'untiled'}", measure)
    vae.disable_tiling()  # the engine sets tiling per call again


# --- 7. a batch of 4 against 4 single calls -----------------------------------------------------
def stage_batch(run: Run, stage: Stage) -> None:
    plan = run.plan
    engine = run.engine()
    stage.record["slug"], stage.record["batch"] = "qwen-image-fast", plan.batch
    last_s = 0.0
    for size in plan.batch_sizes:
        requests = [
            dataclasses.replace(request_for("qwen-image-fast", size, plan.fast_steps), seed=seed)
            for seed in range(1, plan.batch + 1)
        ]

        def measure(requests: list[Any] = requests) -> dict[str, Any]:
            engine.generate(dataclasses.replace(requests[0], steps=2))
            engine.generate_batch([dataclasses.replace(r, steps=2) for r in requests])
            run.sync()
            started = time.perf_counter()
            for request in requests:
                engine.generate(request)
            run.sync()
            singles_s = time.perf_counter() - started
            clock = StepClock(run.sync)
            started = clock.start()
            engine.generate_batch(requests, on_step=clock)
            run.sync()
            batch_s = time.perf_counter() - started
            s_per_step = clock.median_step_s()
            return {
                "steps": plan.fast_steps,
                "singles_s": singles_s,
                "batch_s": batch_s,
                "speedup": singles_s / batch_s,
                "s_per_step_batched": s_per_step,
                **flop_fields(run, engine, requests[0], s_per_step, batch=plan.batch),
            }

        row = stage.attempt(f"{label(size)} batch of {plan.batch}", measure, last_s)
        last_s = row["wall_s"] if row else last_s


# --- 8. fp8 modes -------------------------------------------------------------------------------
@contextmanager
def timing_fast_paths(seconds: list[float]) -> Iterator[None]:
    """Times ``apply_fast_paths`` (where fp8 quantisation happens) by wrapping the name
    ``runtime/resident.py`` calls it by: the engine times only whole loads."""
    from qwenserve.runtime import resident as engine_module

    original = getattr(engine_module, "apply_fast_paths", None)
    if original is None:  # moved by a later engine: no split of the load time then
        yield
        return

    def timed_apply(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.synchronize()
            seconds.append(time.perf_counter() - started)

    setattr(engine_module, "apply_fast_paths", timed_apply)  # noqa: B010 (not exported)
    try:
        yield
    finally:
        setattr(engine_module, "apply_fast_paths", original)  # noqa: B010


def stage_fp8(run: Run, stage: Stage) -> None:
    """Each mode on its own engine (the shared bf16 one released first): load time, the part
    of it spent quantising (``quantize_s``: the engine's fast-path step), memory, and seconds
    per step of qwen-image with CFG against bf16's (stage cfg, same size)."""
    from qwenserve.errors import InferenceError
    from qwenserve.runtime import Engine

    plan = run.plan
    record = stage.record
    record["modes"] = list(QUANTIZE_MODES)
    run.release_shared()
    reference = next(
        (
            row
            for row in run.results.get("cfg", {}).get("runs", [])
            if row.get("cfg_batch") and row["label"].startswith(label(plan.fp8_size))
        ),
        None,
    )
    record["bf16_s_per_step"] = (reference or {}).get("s_per_step")
    record["bf16_gpu_allocated_gib"] = run.results.get("build", {}).get("gpu_allocated_gib")
    request = request_for("qwen-image", plan.fp8_size, plan.fp8_steps, guidance=4.0)
    last_s = 0.0
    for mode in QUANTIZE_MODES:

        def measure(mode: str = mode) -> dict[str, Any]:
            try:
                engine = Engine(run.engine_config(quantize=mode))
            except InferenceError as error:  # the engine's check of its switches
                return {"mode": mode, "refused": error.message}
            free_memory()
            quantize_s: list[float] = []
            started = time.perf_counter()
            with timing_fast_paths(quantize_s):
                engine.load("qwen-image")
            run.sync()
            load_s = time.perf_counter() - started
            row: dict[str, Any] = {"mode": mode, "load_s": load_s, **run.memory()}
            row["quantize_s"] = sum(quantize_s) if quantize_s else None
            row.update(timed(run, engine, request))
            if record["bf16_s_per_step"]:
                row["speedup_vs_bf16"] = record["bf16_s_per_step"] / row["s_per_step"]
            del engine
            free_memory()
            return row

        row = stage.attempt(mode, measure, last_s)
        if row and "load_s" in row:
            last_s = row["wall_s"]


# --- 9. compile ---------------------------------------------------------------------------------
def graphs_compiled(engine: Any) -> dict[str, Any]:
    """Compile counts now: dynamo's graph and frame counters, and the engine's own counts
    (``Engine.compile_counts()``: compiles, recompiles, eager fallbacks) when it has them."""
    from torch._dynamo.utils import counters

    found: dict[str, Any] = {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "frames_compiled": int(counters["frames"].get("ok", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        # A warm-up is cold only without hits here (inductor caches graphs on disk).
        "fxgraph_cache_hits": int(counters["inductor"].get("fxgraph_cache_hit", 0)),
    }
    counts = getattr(engine, "compile_counts", None)
    if callable(counts):
        for name, value in counts().items():
            found[f"engine.{name}"] = int(value)
    return found


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {key: after[key] - before.get(key, 0) for key in after}


def stage_compile(run: Run, stage: Stage) -> None:
    plan = run.plan
    record = stage.record
    record["slug"] = "qwen-image-fast"
    run.release_shared()
    engine = run.other_engine(compile=True)
    before = graphs_compiled(engine)
    started = time.perf_counter()
    record["running"] = "warm-up: build, then compile at the slug's default (1:1) size"
    engine.warm_up(["qwen-image-fast"])
    run.sync()
    del record["running"]
    record["warm_up_s"] = time.perf_counter() - started
    record["warm_up_compiles"] = _delta(before, graphs_compiled(engine))
    record["counter_source"] = (
        "engine" if any(k.startswith("engine.") for k in before) else "torch._dynamo counters"
    )
    from qwenserve.catalog import validate_request

    default = validate_request(
        "qwen-image-fast", {"prompt": "warm-up", "steps": plan.fast_steps, "seed": 2}
    )
    size = engine.output_size(default, [])
    record["warm_up_size"] = label(size)
    cases = [
        ("steady (warm-up prompt and size)", default),
        ("new prompt length", dataclasses.replace(default, prompt=LONG_PROMPT)),
        (
            f"new size {label(plan.fast_sizes[0])}",
            dataclasses.replace(default, width=plan.fast_sizes[0][0], height=plan.fast_sizes[0][1]),
        ),
    ]
    for name, request in cases:

        def measure(request: Any = request, engine: Any = engine) -> dict[str, Any]:
            before = graphs_compiled(engine)
            started = time.perf_counter()
            engine.generate(request)  # the first call pays any recompilation
            run.sync()
            first_s = time.perf_counter() - started
            compiles = _delta(before, graphs_compiled(engine))
            steady = timed(run, engine, request, warm=False)
            return {
                "first_call_s": first_s,
                "compiles": compiles,
                "recompiled": compiles["unique_graphs"] > 0 or compiles["frames_compiled"] > 0,
                "ran_eager": compiles.get("engine.eager_fallbacks", 0) > 0,
                **steady,
            }

        stage.attempt(name, measure)
    eager = {
        row["label"]: row.get("s_per_step")
        for row in run.results.get("fast", {}).get("runs", [])
        if not row.get("fused")
    }
    record["eager_s_per_step_same_size"] = eager.get(f"{label(size)} unfused")
    del engine


STAGES: tuple[StageSpec, ...] = (
    StageSpec("env", "environment and bf16 matmul peak", 15, 5, stage_env),
    StageSpec("pytest", "pytest -m gpu", 75, 20, stage_pytest),
    StageSpec("build", "random-full build: time and memory", 45, 15, stage_build),
    StageSpec("cfg", "qwen-image, true CFG, cfg_batch on/off", 100, 20, stage_cfg),
    StageSpec("fast", "qwen-image-fast, Lightning fused/unfused", 70, 15, stage_fast),
    StageSpec("vae", "VAE decode peak memory", 20, 5, stage_vae),
    StageSpec("batch", "batch of 4 vs 4 single calls", 30, 10, stage_batch),
    StageSpec("fp8", "fp8 modes", 80, 20, stage_fp8),
    StageSpec("qwen21", "qwen-image-2.1 at 1024², 40 steps; edit; fast", 90, 30, stage_qwen21),
    StageSpec("compile", "torch.compile: warm-up, steady step, recompiles", 240, 45, stage_compile),
)
"""In order. Budgets (s) fit the GPU plan's 8 minutes when the early stages take what they
usually do; compile, last, gets what is left (``--stages compile`` runs it alone)."""


# --- the command --------------------------------------------------------------------------------
@contextmanager
def stops_at_deadline(run: Run) -> Iterator[None]:
    """A watchdog at the global deadline and a SIGTERM handler, both ending the run cleanly."""
    timer = threading.Timer(
        max(run.deadline - time.perf_counter(), 0.0),
        run.stop,
        args=(f"global deadline ({run.budget_s:.0f} s) reached",),
    )
    timer.daemon = True
    timer.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: run.stop("terminated (SIGTERM)"))
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)


def parse_stage_budgets(values: Sequence[str]) -> dict[str, float]:
    budgets: dict[str, float] = {}
    names = {spec.name for spec in STAGES}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in names or not seconds:
            raise SystemExit(f"--stage-budget {value!r}: expected NAME=SECONDS, NAME in {names}")
        budgets[name] = float(seconds)
    return budgets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_verify.jsonl"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="global deadline")
    parser.add_argument("--stages", help="comma-separated stage names (default: all)")
    parser.add_argument(
        "--stage-budget", action="append", default=[], metavar="NAME=S", help="repeatable"
    )
    parser.add_argument("--runs", type=int, default=1, help="timed requests per case")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, small sizes")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="render results files (e.g. a full run and a --stages compile run) into the docs",
    )
    parser.add_argument("--no-write", action="store_true", help="with --report: print only")
    args = parser.parse_args(argv)
    if args.report is not None:
        from bench.gpu_verify_report import report

        return report(args.report, write=not args.no_write)

    budgets = parse_stage_budgets(args.stage_budget)
    specs = [dataclasses.replace(s, budget_s=budgets.get(s.name, s.budget_s)) for s in STAGES]
    selected = set(args.stages.split(",")) if args.stages else None
    unknown = (selected or set()) - {spec.name for spec in specs}
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or Path(scratch)
        run = Run(plan, args.out, args.budget_s, cache_dir, dry_run=args.dry_run, runs=args.runs)
        if not args.dry_run and not run.torch.cuda.is_available():
            print("no CUDA device: use --dry-run to prove the script on a CPU", file=sys.stderr)
            return 2
        with stops_at_deadline(run):
            run_stages(run, specs, selected)
            run.release_shared()
    print(f"wrote {args.out} in {time.perf_counter() - run.started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
