"""The "GPU proof" section of docs/PERFORMANCE.md, rendered from a ``gpu_verify.py`` results file.

    PYTHONPATH=src python bench/gpu_verify.py --report gpu_verify.jsonl [--no-write]

The section says which kind of run the file holds. A dry run (CPU, tiny preset) is labelled as
such and its timings are not GPU figures; until a GPU run's file is rendered here, the section
says plainly that the proof has not run on a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import write_section

TITLE = "GPU proof (bench/gpu_verify.py)"
HOW_TO_RUN = [
    "how to run it: two commands on the GPU machine (an H200; no internet), each within one"
    " device call, both within a 15-minute lease (machine start included):",
    "  1. here, once: `make gpu-wheels` (the packages that machine lacks, as cp312 wheels in"
    ' `.whl/`, 13 MB; git-ignored, so every device call must carry it: `carry: [".whl"]`)',
    "  2. there: `bash bench/gpu_verify_on_device.sh core` (≤ 285 s: env, build, cfg, vae,"
    " batch, fast, pytest), then `bash bench/gpu_verify_on_device.sh extra` (≤ 255 s: env,"
    " compile, edit, qwen21, fp8, encoders); each writes `$OUT/gpu_verify_<group>.jsonl`",
    '  with the device tool, exactly: `run(command="bash bench/gpu_verify_on_device.sh core",'
    ' carry=[".whl"], kind="nvidia-h200", timeout_s=330)`, then `run(command="bash'
    ' bench/gpu_verify_on_device.sh extra", carry=[".whl"], kind="nvidia-h200",'
    " timeout_s=300)` on the same warm machine, then `give_back` (≈ 10.5 min of device time"
    " plus the machine's start)",
    "  3. here: `PYTHONPATH=src python bench/gpu_verify.py --report gpu_verify_core.jsonl"
    " gpu_verify_extra.jsonl` (this section; the second file completes the first)",
    "the CPU proof of the script itself: `make gpu-verify-dry-run` (every stage on the tiny"
    " preset; tests/bench/test_gpu_verify.py runs it in CI)",
]


@dataclass(frozen=True)
class Anchor:
    """A figure measured by others to compare a row with: seconds per image."""

    stage: str
    label_prefix: str
    """Rows of ``stage`` whose label starts with this are compared (the dry run's never are)."""
    what: str
    seconds: float


ANCHORS = (
    Anchor("cfg", "1024x1024 50 steps", "SGLang, one H100: Qwen-Image 1024², 50 steps, CFG", 12.77),
    Anchor("edit", "1024x1024, 2 references, 40 steps", "SGLang, one H100: 2-ref edit", 38.63),
    Anchor("qwen21", "text-to-image 1024x1024", "SGLang, one H200: 2.1, 1024², 40 steps", 4.48),
)


def anchor_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """The rows measured against the anchors: seconds per image, the anchor's, their ratio
    (below 1: faster than the anchor), and the row's share of the measured matmul peak."""
    by_stage = {record.get("stage"): record for record in records}
    lines = [
        "| case | measured s/image | anchor | anchor s | measured / anchor | share of peak |",
        "|---|---|---|---|---|---|",
    ]
    compared = 0
    for anchor in ANCHORS:
        for row in by_stage.get(anchor.stage, {}).get("runs", []):
            seconds = row.get("s_per_image")
            if not str(row.get("label", "")).startswith(anchor.label_prefix) or not seconds:
                continue
            compared += 1
            cells = [row["label"], _cell(seconds), anchor.what, str(anchor.seconds)]
            cells += [_cell(seconds / anchor.seconds), _cell(row.get("share_of_peak"))]
            lines.append("| " + " | ".join(cells) + " |")
    if not compared:
        known = "; ".join(f"{a.what}: {a.seconds} s" for a in ANCHORS)
        return [f"- anchors (no GPU row to compare with yet): {known}"]
    return lines


def derived_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Figures read across stages (and files): the VAE's bytes per pixel against the
    runtime's constant, fp8 against bf16 when the two ran in different commands."""
    by_stage = {record.get("stage"): record for record in records}
    lines: list[str] = []
    vae = by_stage.get("vae", {})
    if vae.get("measured_bytes_per_pixel"):
        lines.append(
            f"- VAE decode: {_cell(vae['measured_bytes_per_pixel'])} bytes per output pixel"
            f" measured (untiled, {vae.get('dtype')}, the largest of its rows); the runtime"
            f" assumes {vae.get('runtime_bytes_per_pixel')} ({vae.get('runtime_source')}):"
            " set the per-device figure (runtime/memory_plan.py) from the measured one"
        )
    env = by_stage.get("env", {})
    if env.get("peak_tflops") and env.get("spec_peak_tflops"):
        lines.append(
            f"- measured matmul peak {_cell(env['peak_tflops'])} TFLOP/s ="
            f" {_cell(env['peak_tflops'] / env['spec_peak_tflops'])} of the"
            f" {_cell(env['spec_peak_tflops'])} TFLOP/s yardstick"
        )
    fp8 = by_stage.get("fp8", {})
    reference = next(
        (
            row.get("s_per_step")
            for row in by_stage.get("cfg", {}).get("runs", [])
            if row.get("cfg_batch") is False
        ),
        None,
    )
    for row in fp8.get("runs", []):
        if reference and row.get("s_per_step") and not row.get("speedup_vs_bf16"):
            lines.append(
                f"- fp8 {row.get('mode')}: {_cell(reference / row['s_per_step'])}x bf16's step"
                " (cfg stage, pairing off; both sizes' first case)"
            )
    return lines


SKIP_COLUMNS = {"label", "wall_s"}


def read_results(*paths: Path) -> list[dict[str, Any]]:
    """The stage lines of one or more results files, one per stage in first-seen order: a
    later file's line replaces an earlier one unless it is a skip (so a ``--stages compile``
    run completes a full one). A line cut off by a kill is dropped."""
    by_stage: dict[str, dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            name = record.get("stage")
            if name not in by_stage or record.get("status") != "skipped":
                by_stage[name] = record
    return list(by_stage.values())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "/")


def _runs_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns and key not in SKIP_COLUMNS]
    lines = [
        "| case | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [_cell(row.get(column)) for column in columns]
        lines.append(f"| {row.get('label', '')} | " + " | ".join(cells) + " |")
    return lines


def _stage_summary(record: dict[str, Any]) -> str:
    """One line: the stage, its status and why (skip reason, error, cases not run)."""
    status = record.get("status", "?")
    text = f"**{record.get('stage')}** ({record.get('title', '')}): {status}"
    if record.get("skipped"):
        text += f" — {record['skipped']}"
    if record.get("error"):
        text += f" — {record['error']}"
    if record.get("wall_s") is not None:
        text += f", {record['wall_s']:.1f} s"
    errors = [row for row in record.get("runs", []) if "error" in row]
    if errors:
        text += "; errors: " + "; ".join(f"{r['label']}: {r['error']}" for r in errors)
    if record.get("not_run"):
        text += "; not run: " + "; ".join(record["not_run"])
    return text


def _stage_facts(record: dict[str, Any]) -> list[str]:
    """The stage's own scalar results (versions, peak, build time, pytest counts)."""
    skip = {"stage", "n", "title", "status", "at", "dry_run", "device", "budget_s", "runs"}
    skip |= {"skipped", "error", "wall_s", "not_run", "tail", "command"}
    facts = [
        f"{key} {_cell(value)}"
        for key, value in record.items()
        if key not in skip and value not in (None, [], {}, "")
    ]
    return [f"  - {', '.join(facts)}"] if facts else []


def render(records: Sequence[dict[str, Any]], source: str) -> str:
    """The section's markdown for ``records`` (one results file)."""
    env = next((r for r in records if r.get("stage") == "env"), {})
    on_gpu = bool(env.get("cuda_available")) and not env.get("dry_run", True)
    lines = ["", f"## {TITLE}", ""]
    if on_gpu:
        lines += [
            f"- GPU run of {env.get('at', '?')}: {env.get('device_name')}, torch "
            f"{env.get('torch')}, CUDA {env.get('cuda')}, diffusers {env.get('diffusers')}",
            f"- measured bf16 matmul peak {_cell(env.get('peak_tflops'))} TFLOP/s (spec"
            f" {_cell(env.get('spec_peak_tflops'))}); share_of_peak = FLOP limit / measured",
            f"- results file: `{source}`",
        ]
    else:
        lines += [
            "- **Not run on a GPU yet**: no GPU device was lent to the session that wrote this"
            " proof, so every GPU figure is still unmeasured and none is given here."
            " Everything below is a **CPU dry run**"
            " (`--dry-run`: tiny preset, small sizes, 2 steps): it proves the script runs every"
            " stage, writes each stage's JSON line and survives refusals; its timings and"
            " shares of peak are the tiny model on this CPU and say nothing about a GPU.",
            f"- dry run of {env.get('at', '?')}: {env.get('device_name', '?')},"
            f" {env.get('cpu_count', '?')} cores, torch {env.get('torch')}, diffusers"
            f" {env.get('diffusers')}; results file `{source}`",
        ]
    lines += [f"- {line}" if not line.startswith("  ") else line for line in HOW_TO_RUN]
    lines += ["", "Against the anchors:", ""]
    lines += anchor_lines(records)
    lines += ["", *derived_lines(records)]
    lines.append("")
    for record in records:
        lines.append(f"- {_stage_summary(record)}")
        lines += _stage_facts(record)
    for record in records:
        if record.get("runs"):
            kind = "" if on_gpu else " (CPU dry run, tiny preset)"
            lines += ["", f"### {record['stage']}: {record.get('title', '')}{kind}", ""]
            lines += _runs_table(record["runs"])
    return "\n".join(lines) + "\n"


def report(paths: Sequence[Path], *, write: bool) -> int:
    """Render ``paths``; print it, and put it in docs/PERFORMANCE.md unless ``write`` is off."""
    records = read_results(*paths)
    if not records:
        print(f"{', '.join(map(str, paths))}: no results")
        return 1
    section = render(records, ", ".join(path.name for path in paths))
    print(section)
    if write:
        write_section(TITLE, section)
    return 0
