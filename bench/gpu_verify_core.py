"""bench/gpu_verify.py's first stages: the environment and the measured matmul peak, the GPU
tests (``pytest -m gpu``, the cold-compile test left to the compile stage) and the shared engine's
build with its time and bytes per component."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from bench.gpu_verify_measure import SPEC_PEAK_TFLOPS, request_for
from bench.gpu_verify_measure import version as _version
from bench.gpu_verify_run import GIB, Run, Stage, free_memory
from bench.step_timing import TransformerShape

ROOT = Path(__file__).resolve().parents[1]
PYTEST_DESELECT = "not compile"
"""``-k`` of the pytest stage: the compile switch's test is a cold Triton compile (minutes), which
the compile stage measures on its own budget."""


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
            *("-m", "pytest", "-m", "gpu", "-k", PYTEST_DESELECT, "-v", "-p", "no:cacheprovider"),
            f"--junitxml={report}",
            *files,
        ]
        record["command"] = " ".join(
            ["python", *command[1:4], "gpu", "-k", f"'{PYTEST_DESELECT}'", *files]
        )
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
    """The shared engine, built once for the command: total time, the random-full build's time
    per component (transformer, VAE, text encoder) and each component's bytes."""
    free_memory()
    started = time.perf_counter()
    engine = run.engine()
    record = stage.record
    record["weights"] = run.plan.weights
    record["build_s"] = time.perf_counter() - started
    pipe = engine.prepare_call(request_for("qwen-image", (256, 256), 2)).pipeline
    transformer = pipe.transformer
    record["transformer_parameters_b"] = sum(p.numel() for p in transformer.parameters()) / 1e9
    record["transformer_shape"] = dataclasses.asdict(TransformerShape.of(transformer))
    record["component_s"] = component_seconds(run, engine)
    record["component_gib"] = {
        name: module_bytes(getattr(pipe, name)) / GIB
        for name in ("transformer", "vae", "text_encoder")
        if getattr(pipe, name, None) is not None
    }
    record.update(run.memory())


def component_seconds(run: Run, engine: Any) -> dict[str, Any] | str:
    """Seconds per component of the shared engine's load: the random-full build's (recorded by
    runtime/random_full.py) or the engine's own ``load_timings()`` (each ``from_pretrained``,
    the fast paths, LoRA fusing) where it has them."""
    found: dict[str, Any] = {}
    if run.plan.weights == "random-full":
        from qwenserve.catalog import get_model
        from qwenserve.runtime import random_full

        base = get_model("qwen-image").recipe.base_weights
        found.update(random_full.BUILD_SECONDS.get(base, {}))
    timings = getattr(engine, "load_timings", None)
    loads = timings() if callable(timings) else []
    if loads:
        last = loads[-1]
        found.update(getattr(last, "components_s", {}) or {})
        for name in ("load_s", "lora_fuse_s", "fast_paths_s", "concurrent"):
            if hasattr(last, name):
                found[name] = getattr(last, name)
    return found or "not recorded by this engine"


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers as stored."""
    tensors = [*module.parameters(), *module.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))
