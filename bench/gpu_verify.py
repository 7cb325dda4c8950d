"""GPU proof in two commands that fit one 15-minute lease: the engine's fast paths on one H200.

    PYTHONPATH=src python bench/gpu_verify.py --stages core  --out core.jsonl     # ≤ 285 s
    PYTHONPATH=src python bench/gpu_verify.py --stages extra --out extra.jsonl \\
        --after core.jsonl                                                      # ≤ 255 s
    PYTHONPATH=src python bench/gpu_verify.py --dry-run          # every stage, on the CPU
    PYTHONPATH=src python bench/gpu_verify.py --report core.jsonl extra.jsonl [--no-write]

``core``: env (versions, device, measured bf16 matmul peak), build (the shared random-full
engine, once per command: time and bytes per component), cfg (qwen-image, true CFG, 50 steps at
1024² and 20 at 1328², pairing on and off on that engine), vae (decode memory per pixel), batch
(4 in one call against 4 single calls), fast (qwen-image-fast, 8 steps, Lightning unfused, then
fused) and pytest (``-m gpu`` without the cold-compile test). ``extra``: env, compile (first, so
it is never starved: cold warm-up, steady step, recompiles), edit (the edit-plus pipeline at its
real size with the 7B encoder: 2 references at 1024², 40 steps, CFG), qwen21 (both 2.1 slugs as
the catalog resolves them: bench/gpu_verify_21.py), fp8 (fp8-memory and fp8-speed) and encoders
(Qwen2.5-VL-7B and Qwen3-VL-8B at full size). Names can be mixed: ``--stages env,cfg``.

Each stage appends its JSON line to ``--out`` the moment it ends; each has a budget and the
budgets of each command add up under its deadline (``GROUP_DEADLINES_S``); a watchdog ends the
run at the deadline (bench/gpu_verify_run.py). Every timing comes with its FLOP limit at the
measured matmul peak: ``share_of_peak`` = limit / measured. ``--dry-run`` runs every stage on
the CPU with the tiny preset at small sizes (compile with the aot_eager backend: inductor's C++
generation takes minutes on a CPU; ``--compile-backend inductor`` runs it anyway).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_verify_21 import stage_qwen21  # noqa: E402
from bench.gpu_verify_core import stage_build, stage_env, stage_pytest  # noqa: E402
from bench.gpu_verify_denoise import stage_batch, stage_cfg, stage_fast, stage_vae  # noqa: E402
from bench.gpu_verify_encoders import stage_edit, stage_encoders  # noqa: E402
from bench.gpu_verify_extra import QUANTIZE_MODES, stage_compile, stage_fp8  # noqa: E402
from bench.gpu_verify_run import (  # noqa: E402
    DRY_PLAN,
    GPU_PLAN,
    RESERVE_S,
    Run,
    Stage,
    StageSpec,
    run_stages,
    stops_at_deadline,
)

STAGES: tuple[StageSpec, ...] = (
    StageSpec("env", "environment and bf16 matmul peak", 10, 4, stage_env),
    StageSpec("build", "random-full build: time and memory per component", 38, 15, stage_build),
    StageSpec("cfg", "qwen-image, true CFG, pairing on/off", 75, 20, stage_cfg),
    StageSpec("vae", "VAE decode peak memory per pixel", 20, 5, stage_vae),
    StageSpec("batch", "batch of 4 vs 4 single calls", 30, 10, stage_batch),
    StageSpec("fast", "qwen-image-fast, Lightning unfused/fused", 55, 15, stage_fast),
    StageSpec("pytest", "pytest -m gpu (no cold compile)", 50, 20, stage_pytest),
    StageSpec("compile", "torch.compile: warm-up, steady step, recompiles", 118, 60, stage_compile),
    StageSpec("edit", "edit-plus at real size: 2 references, 40 steps, CFG", 52, 25, stage_edit),
    StageSpec("qwen21", "qwen-image-2.1 at 1024², 40 steps; edit; fast", 35, 15, stage_qwen21),
    StageSpec("fp8", "fp8 modes", 24, 12, stage_fp8),
    StageSpec("encoders", "full-size text encoders: build, bytes, encode", 13, 6, stage_encoders),
)
"""In order. Budgets (s) are estimates for an H200 (nothing here has run on a GPU yet)."""
GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("env", "build", "cfg", "vae", "batch", "fast", "pytest"),
    "extra": ("env", "compile", "edit", "qwen21", "fp8", "encoders"),
}
GROUP_DEADLINES_S = {"core": 285.0, "extra": 255.0}
"""Each command's global deadline: core ≤ 5 min, both ≤ 9 min, within a 15-minute lease that
also pays the machine's start."""
__all__ = ["DRY_PLAN", "QUANTIZE_MODES", "STAGES", "Run", "Stage", "StageSpec", "run_stages"]


def parse_stages(value: str | None) -> set[str] | None:
    """Stage and group names (comma-separated) as stage names; None: every stage."""
    if not value:
        return None
    names: set[str] = set()
    for name in value.split(","):
        names.update(GROUPS.get(name.strip(), (name.strip(),)))
    return names


def default_budget_s(selected: set[str] | None) -> float:
    """A group's deadline, both groups' for every stage, else the selected stages' default
    budgets and the reserve (``--stage-budget`` narrows a stage, not the run's deadline)."""
    if selected is None or selected == {spec.name for spec in STAGES}:
        return sum(GROUP_DEADLINES_S.values())
    for group, names in GROUPS.items():
        if selected == set(names):
            return GROUP_DEADLINES_S[group]
    return sum(spec.budget_s for spec in STAGES if spec.name in selected) + RESERVE_S


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
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_verify.jsonl"))
    parser.add_argument("--budget-s", type=float, help="global deadline (default: the group's)")
    parser.add_argument("--stages", help="core, extra, or stage names, comma-separated")
    parser.add_argument(
        "--stage-budget", action="append", default=[], metavar="NAME=S", help="repeatable"
    )
    parser.add_argument("--runs", type=int, default=1, help="timed requests per case")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, small sizes")
    parser.add_argument("--compile-backend", help="torch.compile backend (dry run: aot_eager)")
    parser.add_argument(
        "--after", type=Path, nargs="+", default=[], metavar="FILE",
        help="results of an earlier command (fp8's bf16 reference, compile's eager step)",
    )  # fmt: skip
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="render results files (the core and the extra command's) into the docs",
    )
    parser.add_argument("--no-write", action="store_true", help="with --report: print only")
    args = parser.parse_args(argv)
    from bench.gpu_verify_report import read_results, report

    if args.report is not None:
        return report(args.report, write=not args.no_write)

    budgets = parse_stage_budgets(args.stage_budget)
    specs = [dataclasses.replace(s, budget_s=budgets.get(s.name, s.budget_s)) for s in STAGES]
    selected = parse_stages(args.stages)
    unknown = (selected or set()) - {spec.name for spec in specs}
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.compile_backend:
        plan = dataclasses.replace(plan, compile_backend=args.compile_backend)
    budget_s = args.budget_s or default_budget_s(selected) * plan.budget_scale
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or Path(scratch)
        run = Run(plan, args.out, budget_s, cache_dir, dry_run=args.dry_run, runs=args.runs)
        if args.after:
            earlier = read_results(*args.after)
            run.results.update({r["stage"]: r for r in earlier if r.get("status") != "skipped"})
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
