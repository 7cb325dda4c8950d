"""Every benchmark in bench/ runs, at its smallest settings (``--quick``), and produces its figures.

A benchmark nobody runs rots: bench/end_to_end.py once failed at its first line for weeks after
the request list it imports changed shape. Each test here checks one script's run in a
subprocess, as a person would run it, with ``--doc`` and ``--json`` in a temporary folder (the
repository's docs are never touched): it exited 0, and the figures it wrote are all present,
finite and plausible, its section in the doc with the command that made it. The module starts
the selected runs at once, two at a time (smoke_runner.py). The GPU proof (bench/gpu_verify.py)
has its own tests (test_gpu_verify.py); the last test here fails when a new script in bench/ has
no smoke run or no line in ``make bench``.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench.engine_vs_diffusers import REQUESTS, label
from bench.gpu_step_time import EXIT_NO_CUDA
from bench.report import DOC

from qwenserve.catalog import ALL_MODELS
from tests.bench.smoke_runner import Bench, SmokeRunner

ROOT = Path(__file__).resolve().parents[2]

BENCHES = {
    "test_encoding": Bench("encoding.py", "Encoding a 128x128 result", cache=False, cost_s=1),
    "test_cpu_vae_norm": Bench(
        "cpu_vae_norm.py", "VAE decode on a CPU: channel norm (tiny preset, 256x256)", cost_s=7
    ),
    "test_cfg_batch": Bench(
        "cfg_batch.py",
        "CFG passes paired (tiny preset, qwen-image, 2 steps, guidance 3.5)",
        cost_s=7,
    ),
    "test_content_policy": Bench(
        "content_policy.py",
        "Content policy: prompt check and image classifier per request",
        cost_s=8,
    ),
    "test_memory": Bench(
        "memory.py", "Peak memory with all five slugs resident (tiny preset)", cost_s=8
    ),
    "test_engine_vs_diffusers": Bench(
        "engine_vs_diffusers.py", "Engine vs direct diffusers call (tiny preset)", cost_s=13
    ),
    "test_end_to_end": Bench(
        "end_to_end.py",
        "End to end through the server vs the bare diffusers call (tiny preset, batch 1)",
        cost_s=28,
        timeout_s=280,
    ),
    "test_server_overhead": Bench(
        "server_overhead.py", "Server overhead and queue throughput (tiny preset)", cost_s=23
    ),
    "test_batching": Bench(
        "batching.py",
        "Batching: 2 concurrent same-shape requests (tiny, qwen-image-fast, 2 steps; "
        "v1, window 50 ms)",
        cost_s=22,
    ),
    "test_queue_throughput": Bench(
        "queue_throughput.py", "Queue throughput and dispatch latency: SQLite vs Redis", cost_s=32
    ),
    "test_claim_cost": Bench(
        "claim_cost.py",
        "Claim cost against queue depth and keys (weighted fair queuing)",
        cache=False,
        cost_s=3,
    ),
    "test_submit_wait": Bench(
        "submit_wait.py",
        "Submit cost of accepted-means-replicated (QWENSERVE_REDIS_MIN_REPLICAS)",
        cache=False,
        cost_s=3,
    ),
    "test_request_calls_against_head": Bench(
        "request_calls.py",
        "Python calls per request: this checkout",
        args=("--baseline", "HEAD"),
        cache=False,
        cost_s=17,
        git=True,
    ),
    "test_revision_overhead_against_head": Bench(
        "revision_overhead.py",
        "Queue endpoints: this checkout",
        args=("--baseline", "HEAD"),
        cost_s=26,
        git=True,
    ),
    "test_cold_start": Bench(
        "cold_start.py",
        "Cold start: concurrent vs one-after-the-other loading (tiny models, CPU)",
        cost_s=7,
    ),
    "test_engine_boundary": Bench(
        "engine_boundary.py",
        "The engine's process boundary (tiny preset, qwen-image-fast 256x256, 2 steps)",
        cost_s=20,
    ),
    "test_gpu_step_time_says_it_needs_cuda": Bench(
        "gpu_step_time.py", "", cache=False, cost_s=2, env={"CUDA_VISIBLE_DEVICES": ""}
    ),
}
"""Each test's run, by test name; the module's fixture starts the selected ones at once. The
costs are CPU seconds measured alone with a warm model cache (2026-12-07): ~200 s in all, about
half of it importing torch and diffusers (5-7 s in each of 17 processes)."""


def _git_checkout() -> bool:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD"], capture_output=True, check=False
    )
    return done.returncode == 0


HAS_GIT = shutil.which("git") is not None and _git_checkout()
HAS_REDIS = shutil.which("redis-server") is not None
needs_git = pytest.mark.skipif(
    not HAS_GIT,
    reason="compares against a git revision: needs a git checkout with a commit (CI's clone is)",
)


@pytest.fixture(scope="module")
def smoke(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> Iterator[SmokeRunner]:
    """Every selected test's script, started at once in two lanes (smoke_runner.py)."""
    selected = [
        item.name
        for item in request.session.items
        if getattr(item, "module", None) is sys.modules[__name__] and item.name in BENCHES
    ]
    skipped = {name for name, bench in BENCHES.items() if bench.git and not HAS_GIT}
    if not HAS_REDIS:
        skipped.update({"test_queue_throughput", "test_claim_cost", "test_submit_wait"})
    selected = [name for name in selected if name not in skipped]
    runner = SmokeRunner(
        {name: BENCHES[name] for name in selected}, tmp_path_factory.mktemp("bench"), shared_cache
    )
    yield runner
    runner.close()


def _figures(smoke: SmokeRunner, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The calling test's run: it exited 0, wrote its section (titled, with its command and the
    quick-run note) to its own doc and nothing to the repository's; its JSON figures."""
    outcome = smoke.outcome(request.node.name)
    assert outcome.returncode == 0, outcome.describe()
    written = outcome.doc.read_text()
    assert f"\n## {outcome.bench.title}" in written, written
    assert f"- command: `python bench/{outcome.bench.script} --quick" in written
    assert "quick run (`--quick`" in written  # a smoke run's figures say what they are
    assert str(outcome.folder) not in DOC.read_text(), "a smoke run wrote docs/PERFORMANCE.md"
    return outcome.figures()


def _positive(value: Any) -> float:
    """``value`` as a float that is a real measurement: finite and above zero."""
    number = float(value)
    assert math.isfinite(number) and number > 0, value
    return number


def test_encoding(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    rows = _figures(smoke, request)["encodings"]
    assert {(r["image"], r["format"]) for r in rows} == {
        (image, kind)
        for image in ("photo-like (synthetic)", "noise")
        for kind in ("png", "webp", "jpeg")
    }
    for row in rows:
        for name in ("pillow_ms", "qwenserve_ms", "pillow_bytes", "qwenserve_bytes"):
            _positive(row[name])
        # An encoded 128x128 RGB picture: at most its raw size plus headers.
        assert row["qwenserve_bytes"] < 128 * 128 * 3 * 1.1


def test_cpu_vae_norm(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    assert set(figures) == {"batch 1", "batch 2"}
    for row in figures.values():
        _positive(row["diffusers_s"])
        _positive(row["qwenserve_s"])
        assert row["max_abs_difference"] < 1e-3  # the fast norm computes the same decode


def test_cfg_batch(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    _positive(figures["on_s"])
    _positive(figures["off_s"])
    assert figures["paired_calls_per_image"] == 2  # one paired call per step with it on
    assert 0 <= figures["max_difference_levels"] <= 8


def test_content_policy(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    for name in ("prompt_check_ms", "prompt_check_tricky_ms", "classifier_load_ms"):
        _positive(figures[name])
    assert len(figures["classifier_ms"]) == 3
    for ms in figures["classifier_ms"].values():
        _positive(ms)
    assert all(0 <= score < 0.5 for score in figures["classifier_score"].values())
    _positive(figures["generation_ms"])


def test_memory(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    peaks = figures["peak_rss_mib"]
    assert list(peaks) == [spec.slug for spec in ALL_MODELS]
    values = [_positive(v) for v in peaks.values()]
    assert values == sorted(values)  # a peak never goes down
    assert figures["resident"]


def test_engine_vs_diffusers(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    rows = _figures(smoke, request)["requests"]
    assert [r["slug"] for r in rows] == [slug for slug, _, _ in REQUESTS]
    for row in rows:
        engine_s, direct_s = _positive(row["engine_s"]), _positive(row["direct_s"])
        assert 0.05 < engine_s / direct_s < 20, row


def test_end_to_end(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    rows = _figures(smoke, request)["requests"]
    assert list(rows) == [label(slug, references) for slug, _, references in REQUESTS]
    for row in rows.values():
        served, bare = _positive(row["served_s"]), _positive(row["direct_s"])
        assert 0.05 < served / bare < 20, row
        assert 0.05 < row["ratio"] < 20, row


def test_server_overhead(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    for value in figures.values():
        _positive(value)
    # A v1 answer includes a real generation. Loosely: the server's engine runs in its own
    # process (its own torch threads), the direct one in the bench's, and on a loaded 2-core
    # machine either can be twice as slow as the other.
    assert figures["v1_server_s"] > figures["v1_engine_s"] * 0.25


def test_batching(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    assert figures["requests"] == 2
    _positive(figures["off_s"])
    _positive(figures["on_s"])
    assert figures["speedup"] == pytest.approx(figures["off_s"] / figures["on_s"])


@pytest.mark.redis
@pytest.mark.skipif(not HAS_REDIS, reason="needs the redis-server binary")
def test_queue_throughput(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    assert set(figures) == {"sqlite", "redis"}
    for store in figures.values():
        assert set(store) == {
            "submits_per_s",
            "polls_per_s",
            "queue_wait_s",
            "v1_wall_s",
            "v1_end_to_response_s",
        }
        for value in store.values():
            _positive(value)
        assert store["v1_end_to_response_s"] < store["v1_wall_s"]


@pytest.mark.redis
@pytest.mark.skipif(not HAS_REDIS, reason="needs the redis-server binary")
def test_claim_cost(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    assert set(figures) == {"sqlite", "redis"}
    for rows in figures.values():
        assert set(rows) == {
            f"{depth} jobs, {keys} keys" for depth in (200, 1000) for keys in (1, 100)
        }
        for row in rows.values():
            assert _positive(row["median_ms"]) <= _positive(row["p95_ms"])
            assert row["median_ms"] < 50  # one claim: well under a frame, whatever the depth


@pytest.mark.redis
@pytest.mark.skipif(not HAS_REDIS, reason="needs the redis-server binary")
def test_submit_wait(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    assert set(figures) == {
        "none_median_ms",
        "none_p95_ms",
        "wait1_median_ms",
        "wait1_p95_ms",
        "median_ratio",
        "p95_ratio",
    }
    for name in ("none", "wait1"):
        assert _positive(figures[f"{name}_median_ms"]) <= _positive(figures[f"{name}_p95_ms"])
    ratio = figures["wait1_median_ms"] / figures["none_median_ms"]
    assert _positive(figures["median_ratio"]) == pytest.approx(ratio)
    assert figures["wait1_median_ms"] < 1000  # a WAIT answered by a live replica, not timed out


@needs_git
def test_request_calls_against_head(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    assert figures["sides"][0].startswith("baseline ")
    for side in ("baseline", "measured"):
        assert set(figures[side]) == {"calls per status poll", "calls per submit"}
        for calls in figures[side].values():
            # A request through routing, middleware and a handler: hundreds of calls.
            assert 50 < _positive(calls) < 100_000
    outcome = smoke.outcome(request.node.name)
    assert outcome.worktrees_after <= outcome.worktrees_before  # the baseline's is removed


@needs_git
def test_revision_overhead_against_head(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    assert set(figures["per_second"]) == {
        "polls idle",
        "submits idle",
        "polls busy",
        "submits busy",
    }
    for row in figures["per_second"].values():
        _positive(row["baseline"])
        _positive(row["measured"])
        assert row["ratio"] == pytest.approx(row["measured"] / row["baseline"])
    outcome = smoke.outcome(request.node.name)
    assert outcome.worktrees_after <= outcome.worktrees_before  # the baseline's is removed


def test_cold_start(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    for mode in ("serial", "concurrent"):
        load = figures[f"tiny/{mode}"]
        assert set(load) == {"load_s", "text_encoder_s", "transformer_s", "vae_s"}
        for value in load.values():
            _positive(value)
        # Components load inside the load: none takes longer than the whole.
        assert max(load[n] for n in ("text_encoder_s", "transformer_s", "vae_s")) <= load["load_s"]
    assert figures["tiny/ratio"] == pytest.approx(
        figures["tiny/concurrent"]["load_s"] / figures["tiny/serial"]["load_s"]
    )


def test_engine_boundary(smoke: SmokeRunner, request: pytest.FixtureRequest) -> None:
    figures = _figures(smoke, request)
    local_s, child_s = _positive(figures["inprocess_s"]), _positive(figures["child_s"])
    assert figures["ratio"] == pytest.approx(child_s / local_s)
    boundary_ms = _positive(figures["boundary_ms"])
    fastest_s = _positive(figures["inprocess_min_s"])
    assert fastest_s <= local_s and _positive(figures["child_min_s"]) <= child_s
    assert figures["min_ratio"] == pytest.approx(figures["child_min_s"] / fastest_s)
    assert figures["boundary_pct"] == pytest.approx(boundary_ms / 10 / fastest_s)
    assert boundary_ms < 1000 * fastest_s  # the boundary alone is cheaper than an image
    assert figures["inprocess_outside_ms"] >= 0 and _positive(figures["child_outside_ms"])
    added = figures["child_outside_ms"] - figures["inprocess_outside_ms"]
    assert figures["added_ms"] == pytest.approx(added)
    assert (figures["width"], figures["height"]) == (256, 256)


def test_gpu_step_time_says_it_needs_cuda(
    smoke: SmokeRunner, request: pytest.FixtureRequest
) -> None:
    """Without CUDA (hidden from it on any machine) it measures nothing, writes nothing, and
    exits with its own status, so ``make bench`` can tell "no GPU" from a failure."""
    outcome = smoke.outcome(request.node.name)
    assert outcome.returncode == EXIT_NO_CUDA == 3, outcome.describe()
    assert "needs CUDA" in outcome.stderr
    assert not outcome.doc.exists() and not outcome.figures_path.exists()


GPU_PROOF = {"gpu_verify.py"}
"""Scripts with their own target (``make gpu-verify-dry-run``) and tests (test_gpu_verify.py)."""


def test_every_benchmark_is_in_make_bench_and_has_a_smoke_test() -> None:
    """A new script in bench/ is run by ``make bench`` and smoke-tested here, or this fails."""
    scripts = {
        path.name
        for path in (ROOT / "bench").glob("*.py")
        if '\nif __name__ == "__main__":' in path.read_text()
    }
    assert "end_to_end.py" in scripts
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^bench:\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe is not None
    listed = re.findall(r"bench/(\w+\.py)", recipe.group(1))
    assert sorted(listed) == sorted(scripts - GPU_PROOF), "make bench: one command per script"
    assert sorted(b.script for b in BENCHES.values()) == sorted(scripts - GPU_PROOF)
    assert all(name in globals() for name in BENCHES)
