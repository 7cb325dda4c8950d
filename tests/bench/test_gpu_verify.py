"""The GPU proof script (bench/gpu_verify.py), proven on the CPU: GPU minutes are scarce, so a
broken stage must show up here, not on the lent machine. The watchdog, the budgets and the CFG
comparison: test_gpu_verify_run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from bench.gpu_verify import (
    DRY_PLAN,
    QUANTIZE_MODES,
    STAGES,
    Run,
    Stage,
    StageSpec,
    run_stages,
)
from bench.gpu_verify_report import read_results, render

from qwenserve.errors import InferenceError

ROOT = Path(__file__).resolve().parents[2]
COMMON_KEYS = {"stage", "n", "title", "status", "at", "dry_run", "device", "budget_s"}
STAGE_KEYS = {
    "env": {"torch", "diffusers", "cuda_available", "device_name", "peak_tflops", "runs"},
    "pytest": {
        "files",
        "returncode",
        "collected",
        "passed",
        "failed",
        "skipped_tests",
        "duration_s",
    },
    "build": {"weights", "build_s", "transformer_parameters_b", "component_s", "component_gib"},
    "cfg": {"slug", "attention", "runs"},
    "fast": {"slug", "target_s_per_image", "load_s_unfused", "load_s_fused", "runs"},
    "vae": {"sizes", "memory_measured", "runtime_bytes_per_pixel", "runtime_source", "runs"},
    "batch": {"slug", "batch", "runs"},
    "fp8": {"modes", "bf16_s_per_step", "runs"},
    "qwen21": {"slug", "size", "steps", "load_s", "base_weights", "runs"},
    "encoders": {"full_size", "tokens", "sharing", "runs"},
    "edit": {"slug", "layout", "references", "steps", "guidance", "encoder_gib", "runs"},
}
TIMING_KEYS = {"s_per_step", "tflop_per_step", "limit_s_per_step", "share_of_peak"}
ROW_KEYS = {
    "cfg": {"cfg_batch", "s_per_image", "transformer_calls_per_step", "paired_calls", *TIMING_KEYS},
    "fast": {"fused", "s_per_image", "meets_target", *TIMING_KEYS},
    "vae": {"batch", "tiled", "decode_s", "peak_gib"},
    "batch": {"singles_s", "batch_s", "speedup", "share_of_peak"},
    "qwen21": {"slug", "references", "s_per_step", "s_per_image", "kv_cache_estimate_gib"},
    "encoders": {"build_s", "parameters_b", "gib", "encode_s", "encode_s_with_negative"},
    "edit": {"s_per_step", "s_per_image", "transformer_calls_per_step", "outside_steps_s"},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


@pytest.mark.slow
def test_dry_run_writes_every_stage_with_its_measurements(
    tmp_path: Path, shared_cache: Path
) -> None:
    out = tmp_path / "gpu_verify.jsonl"
    # compile has its own test below (a minute and more on two busy cores): budget 0 here,
    # which must still give its line.
    command = [sys.executable, "bench/gpu_verify.py", "--dry-run", "--out", str(out)]
    command += ["--cache-dir", str(shared_cache), "--stage-budget", "compile=0"]
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stderr[-3000:]

    records = read_results(out)
    assert [r["stage"] for r in records] == [spec.name for spec in STAGES]
    by_stage = {r["stage"]: r for r in records}
    for record in records:
        assert record.keys() >= COMMON_KEYS, record["stage"]
        assert record["dry_run"] is True and record["device"] == "cpu"
    for name, keys in STAGE_KEYS.items():
        record = by_stage[name]
        assert record["status"] == "ok", (name, record.get("error"), record.get("not_run"))
        assert keys <= record.keys(), (name, keys - record.keys())
    for name, keys in ROW_KEYS.items():
        for row in by_stage[name]["runs"]:
            assert keys <= row.keys(), (name, row)
    assert by_stage["compile"]["status"] == "skipped"
    assert "budget is 0" in by_stage["compile"]["skipped"]
    # The shared engine was built once for the whole command.
    builds = [r["shared_engine_builds"] for r in records if r["status"] == "ok"]
    assert builds[0] == 0 and set(builds[1:]) == {1}, builds  # env runs before the build

    # pytest -m gpu ran the GPU tests but the cold compile one and, on a CPU, every one skipped.
    tests = by_stage["pytest"]
    assert tests["collected"] > 0 and tests["skipped_tests"] == tests["collected"]
    assert tests["failed"] == tests["errors"] == 0
    assert "not compile" in tests["command"]
    # cfg: each case paired, then not: one transformer call per step against two.
    cfg = by_stage["cfg"]
    assert [row["cfg_batch"] for row in cfg["runs"]] == [True, False] * len(DRY_PLAN.cfg_cases)
    assert [row["transformer_calls_per_step"] for row in cfg["runs"]] == [1, 2] * 2
    assert all(row["forwards_per_step"] == 2 for row in cfg["runs"])
    assert cfg["attention"]["sdpa_ops_cfg_batch_on"]
    # Each fp8 mode has its own line: refused by the engine, failed, or measured.
    modes = {row["mode"]: row for row in by_stage["fp8"]["runs"]}
    assert set(modes) == set(QUANTIZE_MODES)
    assert all({"refused", "error", "s_per_step"} & row.keys() for row in modes.values())
    assert by_stage["env"]["peak_tflops"] > 0
    # qwen21: text-to-image, an edit with two references (a larger KV cache), the fast slug
    # at the catalog's default steps.
    q21 = by_stage["qwen21"]["runs"]
    assert [row["references"] for row in q21] == [0, 2, 0]
    assert q21[1]["kv_cache_estimate_gib"] > q21[0]["kv_cache_estimate_gib"]
    assert q21[2]["slug"] == "qwen-image-2.1-fast"
    # Both text encoders encoded finite embeddings of their own width; the edit ran CFG
    # (two transformer calls per step) with two references.
    encoders = {row["label"]: row for row in by_stage["encoders"]["runs"]}
    assert set(encoders) == {"Qwen2.5-VL-7B", "Qwen3-VL-8B"}
    assert all(row["finite"] for row in encoders.values())
    assert by_stage["edit"]["runs"][0]["transformer_calls_per_step"] == 2

    section = render(records, out.name)
    assert "Not run on a GPU yet" in section and "CPU dry run" in section
    assert all(f"**{spec.name}**" in section for spec in STAGES)
    assert "12.77" in section and "38.63" in section and "4.48" in section


@pytest.mark.slow
def test_dry_run_of_compile_warms_up_and_does_not_recompile(
    tmp_path: Path, shared_cache: Path
) -> None:
    """The compile stage on the smallest model (tiny preset, aot_eager backend): the warm-up
    compiles and a new prompt length reuses it."""
    out = tmp_path / "compile.jsonl"
    command = [sys.executable, "bench/gpu_verify.py", "--dry-run", "--out", str(out)]
    command += ["--cache-dir", str(shared_cache), "--stages", "env,compile"]
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = {r["stage"]: r for r in read_results(out)}["compile"]
    assert compiled["status"] == "ok", (compiled.get("error"), compiled.get("runs"))
    assert compiled["backend"] == "aot_eager"
    assert compiled["warm_up_compiles"]["engine.compiles"] > 0
    rows = {row["label"]: row for row in compiled["runs"]}
    assert rows["new prompt length"]["recompiled"] is False


def _spec(name: str, body: Any, budget_s: float = 30.0, min_s: float = 0.0) -> StageSpec:
    return StageSpec(name, f"stage {name}", budget_s, min_s, lambda run, stage: body(stage))


def _raise(error: Exception) -> Any:
    """A stage body or a measurement (any arguments) that raises ``error``."""

    def fail(*_: Any) -> Any:
        raise error

    return fail


def test_a_failing_stage_writes_its_error_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    run = Run(DRY_PLAN, out, 60.0, tmp_path, dry_run=True)

    def measures(stage: Stage) -> None:
        stage.attempt("fits", lambda: {"value": 1})
        stage.attempt("fails", _raise(InferenceError("out of memory on the GPU")))
        stage.attempt("too long", lambda: {"value": 2}, estimate_s=1e6)

    run_stages(
        run,
        [
            _spec("broken", _raise(RuntimeError("boom"))),
            _spec("oom", _raise(InferenceError("out of memory while generating"))),
            _spec("cases", measures),
            _spec("late", measures, min_s=1e6),
            _spec("unselected", measures),
        ],
        selected={"broken", "oom", "cases", "late"},
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_stage = {line["stage"]: line for line in lines}
    assert [line["stage"] for line in lines] == ["broken", "oom", "cases", "late", "unselected"]
    assert by_stage["broken"]["status"] == "error"
    assert by_stage["broken"]["error"] == "RuntimeError: boom"
    assert by_stage["oom"]["oom"] is True
    cases = by_stage["cases"]
    assert cases["status"] == "partial"
    assert [row["label"] for row in cases["runs"]] == ["fits", "fails"]
    assert cases["runs"][1]["oom"] is True and "out of memory" in cases["runs"][1]["error"]
    assert cases["not_run"][0].startswith("too long:")
    assert by_stage["late"]["skipped"].startswith("global budget")
    assert by_stage["unselected"]["skipped"] == "not selected (--stages)"


def test_the_watchdog_writes_the_running_stage_and_stops_at_the_deadline(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from bench.gpu_verify import DRY_PLAN, Run, StageSpec, run_stages, stops_at_deadline

        def slow(run, stage):
            stage.record["measured_before_the_deadline"] = 1
            time.sleep(60)

        run = Run(DRY_PLAN, Path({str(out)!r}), 4.0, Path("."), dry_run=True)
        specs = [StageSpec("slow", "slow", 30, 0, slow), StageSpec("next", "next", 30, 0, slow)]
        with stops_at_deadline(run):
            run_stages(run, specs)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, timeout=60
    )
    assert done.returncode == 3, done.stderr[-2000:]
    slow, after = read_results(out)
    assert slow["status"] == "error" and "global deadline (4 s)" in slow["error"]
    assert slow["measured_before_the_deadline"] == 1 and slow["wall_s"] < 10
    assert after == {
        "stage": "next",
        "status": "skipped",
        "skipped": "global deadline (4 s) reached",
    }


def test_the_report_of_a_gpu_run_shows_its_device_and_tables() -> None:
    """Rendering only: these records are made up here and never reach the docs."""
    env = {"stage": "env", "status": "ok", "dry_run": False, "cuda_available": True}
    env |= {"device_name": "NVIDIA H200", "peak_tflops": 700.0, "runs": []}
    fast = {"stage": "fast", "title": "qwen-image-fast", "status": "partial", "wall_s": 1.0}
    fast |= {
        "runs": [{"label": "1024x1024 fused", "s_per_image": 1.0, "meets_target": True}],
        "not_run": ["1328x1328 fused: stage budget"],
    }
    section = render([env, fast], "gpu_verify.jsonl")
    assert "Not run on a GPU yet" not in section and "NVIDIA H200" in section
    assert "**fast** (qwen-image-fast): partial" in section
    assert "not run: 1328x1328 fused: stage budget" in section
    assert "| 1024x1024 fused | 1 | yes |" in section


def test_a_second_results_file_completes_the_first(tmp_path: Path) -> None:
    full, follow_up = tmp_path / "full.jsonl", tmp_path / "compile.jsonl"
    full.write_text(
        '{"stage": "env", "status": "ok", "peak_tflops": 700}\n'
        '{"stage": "compile", "status": "skipped", "skipped": "global budget"}\n'
        '{"stage": "fp8", "status": "ok", "modes": []}\n'
        '{"stage": "cut off by a ki'
    )
    follow_up.write_text(
        '{"stage": "env", "status": "ok", "peak_tflops": 710}\n'
        '{"stage": "compile", "status": "ok", "warm_up_s": 90}\n'
        '{"stage": "fp8", "status": "skipped", "skipped": "not selected (--stages)"}\n'
    )
    records = read_results(full, follow_up)
    assert [(r["stage"], r["status"]) for r in records] == [
        ("env", "ok"),
        ("compile", "ok"),
        ("fp8", "ok"),
    ]
    assert records[0]["peak_tflops"] == 710 and records[1]["warm_up_s"] == 90


def test_pytest_cut_off_at_its_stage_budget_still_writes_its_line(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "bench/gpu_verify.py", "--dry-run", "--out", str(out)]
    command += ["--stages", "pytest", "--stage-budget", "pytest=0.5"]  # 2 s at the dry run's x4
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tests = {r["stage"]: r for r in read_results(out)}["pytest"]
    assert tests["timed_out"] is True and tests["status"] == "partial"
    assert tests["returncode"] is None and tests["duration_s"] < 10


def test_the_report_compares_gpu_rows_with_the_anchors_and_the_vae_constant() -> None:
    """Rendering only: made-up GPU records, never written to the docs."""
    env = {"stage": "env", "status": "ok", "dry_run": False, "cuda_available": True}
    env |= {"device_name": "NVIDIA H200", "peak_tflops": 632.0, "spec_peak_tflops": 790.0}
    cfg = {"stage": "cfg", "status": "ok", "runs": [
        {"label": "1024x1024 50 steps cfg_batch=off", "cfg_batch": False, "s_per_step": 0.2,
         "s_per_image": 10.9, "share_of_peak": 0.8},
        {"label": "1328x1328 20 steps cfg_batch=off", "cfg_batch": False, "s_per_image": 9.0},
    ]}  # fmt: skip
    edit = {"stage": "edit", "status": "ok", "runs": [
        {"label": "1024x1024, 2 references, 40 steps, CFG", "s_per_image": 30.0},
    ]}  # fmt: skip
    vae: dict[str, Any] = {"stage": "vae", "status": "ok", "dtype": "bfloat16"}
    vae |= {"measured_bytes_per_pixel": 3000.0, "runtime_bytes_per_pixel": 4096}
    vae |= {"runtime_source": "scaled: the CPU float32 figure halved"}
    fp8 = {"stage": "fp8", "status": "ok", "runs": [{"mode": "fp8-speed", "s_per_step": 0.16}]}
    section = render([env, cfg, edit, vae, fp8], "gpu_verify_core.jsonl")
    assert "| 1024x1024 50 steps cfg_batch=off | 10.9 | SGLang, one H100" in section
    assert "| 12.77 | 0.854 | 0.8 |" in section  # 10.9 / 12.77
    assert "| 38.63 | 0.777 |" in section  # the edit: 30 / 38.63
    assert "1328x1328" not in section.split("Against the anchors")[1].split("- **")[0]
    assert "3e+03 bytes per output pixel measured" in section
    assert "the runtime assumes 4096 (scaled: the CPU float32 figure halved)" in section
    assert "0.8 of the 790 TFLOP/s yardstick" in section
    assert "fp8 fp8-speed: 1.25x bf16's step" in section


def test_the_dry_run_report_lists_the_anchors_without_comparing() -> None:
    env = {"stage": "env", "status": "ok", "dry_run": True, "cuda_available": False}
    cfg = {"stage": "cfg", "status": "ok", "runs": [{"label": "128x128 2 steps", "s_per_image": 1}]}
    section = render([env, cfg], "dry.jsonl")
    assert "anchors (no GPU row to compare with yet)" in section
    assert "12.77 s" in section and "38.63 s" in section and "4.48 s" in section
