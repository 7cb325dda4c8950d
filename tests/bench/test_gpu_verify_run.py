"""The GPU proof's machinery on the CPU: budgets that fit each command's deadline, a CFG
comparison that really compares (with CUDA's resolution of ``cfg_batch``), and a way out that
always ends the process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bench.gpu_verify import (
    GROUP_DEADLINES_S,
    GROUPS,
    STAGES,
    default_budget_s,
    parse_stages,
)
from bench.gpu_verify_denoise import stage_cfg
from bench.gpu_verify_report import read_results
from bench.gpu_verify_run import DRY_PLAN, RESERVE_S, Run, StageSpec, run_stages

from qwenserve.runtime import config as runtime_config
from qwenserve.runtime import engine as engine_module

ROOT = Path(__file__).resolve().parents[2]
LEASE_PROOF_S = 9 * 60
"""Both commands together (the lease is 15 minutes, the machine's start included)."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


def test_each_commands_budgets_add_up_under_its_deadline() -> None:
    budgets = {spec.name: spec.budget_s for spec in STAGES}
    for group, names in GROUPS.items():
        total = sum(budgets[name] for name in names)
        assert total + RESERVE_S <= GROUP_DEADLINES_S[group], (group, total)
        assert default_budget_s(parse_stages(group)) == GROUP_DEADLINES_S[group]
    assert GROUP_DEADLINES_S["core"] <= 5 * 60
    assert sum(GROUP_DEADLINES_S.values()) <= LEASE_PROOF_S
    # Every stage runs in one of the two commands; the shared-engine stages all in core.
    assert set().union(*GROUPS.values()) == set(budgets)
    assert {"build", "cfg", "vae", "batch", "fast"} <= set(GROUPS["core"])
    # compile comes first after env in its command, so earlier stages cannot starve it, and
    # gets at least the 100 s a cold compile needs.
    assert GROUPS["extra"][:2] == ("env", "compile") and budgets["compile"] >= 100
    order = [spec.name for spec in STAGES]
    for names in GROUPS.values():
        assert [n for n in order if n in names] == list(names)


@pytest.fixture
def cfg_auto_as_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cfg_batch`` auto resolved as on CUDA (off), where the dry run would resolve it on."""
    resolve = runtime_config.resolve_cfg_batch
    monkeypatch.setattr(
        engine_module, "resolve_cfg_batch", lambda config, _device: resolve(config, "cuda")
    )


@pytest.mark.usefixtures("cfg_auto_as_on_cuda")
def test_the_cfg_rows_differ_in_pairing_on_one_engine(tmp_path: Path, shared_cache: Path) -> None:
    plan = dataclasses.replace(DRY_PLAN, cfg_cases=(((128, 128), 2),))
    run = Run(plan, tmp_path / "cfg.jsonl", 120.0, shared_cache, dry_run=True)
    run_stages(run, [StageSpec("cfg", "cfg", 120, 0, stage_cfg)])
    record = run.results["cfg"]
    assert record["status"] == "ok", record.get("runs")
    on, off = record["runs"]
    assert (on["cfg_batch"], off["cfg_batch"]) == (True, False)
    # Paired: one transformer call of 2 rows per step; unpaired: two calls of 1 row.
    assert on["transformer_calls_per_step"] == 1 and on["paired_calls"] == 2
    assert off["transformer_calls_per_step"] == 2 and off["paired_calls"] == 0
    assert on["transformer_rows_per_step"] == off["transformer_rows_per_step"] == 2
    assert run.shared_builds == 1


def _run_script(body: str, out: Path) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        """
        import os, signal, time
        from pathlib import Path
        from bench.gpu_verify_run import DRY_PLAN, Run, StageSpec, run_stages, stops_at_deadline
        """
    ) + textwrap.dedent(body).replace("OUT", repr(str(out)))
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=40,
    )


def test_the_watchdog_exits_even_when_writing_the_last_lines_fails(tmp_path: Path) -> None:
    """The results path is a directory: every write raises, the exit must still happen."""
    out = tmp_path / "a-directory"
    out.mkdir()
    done = _run_script(
        """
        def slow(run, stage):
            time.sleep(60)

        run = Run(DRY_PLAN, Path(OUT), 4.0, Path("."), dry_run=True)
        with stops_at_deadline(run):
            run_stages(run, [StageSpec("slow", "slow", 30, 0, slow)])
        """,
        out,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "while stopping: IsADirectoryError" in done.stderr


def test_sigterm_while_a_line_is_being_written_still_ends_the_run(tmp_path: Path) -> None:
    """SIGTERM arrives while the main thread holds the results lock (mid-write): the handler
    must not wait for that lock on the very thread that holds it."""
    out = tmp_path / "results.jsonl"
    done = _run_script(
        """
        def writing(run, stage):
            with run._lock:  # as run.write's callers hold it
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            time.sleep(60)

        run = Run(DRY_PLAN, Path(OUT), 30.0, Path("."), dry_run=True)
        specs = [StageSpec("writing", "w", 30, 0, writing), StageSpec("next", "n", 30, 0, writing)]
        with stops_at_deadline(run):
            run_stages(run, specs)
        """,
        out,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    writing, after = read_results(out)
    assert writing["status"] == "error" and "terminated (SIGTERM)" in writing["error"]
    assert after == {"stage": "next", "status": "skipped", "skipped": "terminated (SIGTERM)"}
