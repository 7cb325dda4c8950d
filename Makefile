# The commands people and CI both run.
PY ?= python

.PHONY: install serve test lint format typecheck bench gpu-wheels gpu-verify-dry-run

install:
	pip install torch==2.13.0 -e '.[dev]'

serve:
	qwenserve serve

test:
	$(PY) -m pytest -n 3 --dist loadfile

lint:
	ruff check src tests bench
	ruff format --check src tests bench

format:
	ruff format src tests bench

typecheck:
	mypy

# Every benchmark, one command each, writing its section of docs/PERFORMANCE.md (BENCH_ARGS for
# all of them, e.g. `--quick --doc /tmp/p.md` for a smoke run; tests/bench/test_bench_smoke.py
# runs each that way). gpu_step_time.py exits 3 where there is no CUDA: not a failure here.
# revision_overhead.py and request_calls.py compare this checkout with BENCH_BASELINE.
BENCH_ARGS ?=
BENCH_BASELINE ?= HEAD

bench:
	$(PY) bench/engine_vs_diffusers.py $(BENCH_ARGS)
	$(PY) bench/server_overhead.py $(BENCH_ARGS)
	$(PY) bench/end_to_end.py $(BENCH_ARGS)
	$(PY) bench/batching.py $(BENCH_ARGS)
	$(PY) bench/memory.py $(BENCH_ARGS)
	$(PY) bench/queue_throughput.py $(BENCH_ARGS)
	$(PY) bench/claim_cost.py $(BENCH_ARGS)
	$(PY) bench/submit_wait.py $(BENCH_ARGS)
	$(PY) bench/encoding.py $(BENCH_ARGS)
	$(PY) bench/cpu_vae_norm.py $(BENCH_ARGS)
	$(PY) bench/cfg_batch.py $(BENCH_ARGS)
	$(PY) bench/content_policy.py $(BENCH_ARGS)
	$(PY) bench/cold_start.py $(BENCH_ARGS)
	$(PY) bench/engine_boundary.py $(BENCH_ARGS)
	$(PY) bench/revision_overhead.py --baseline $(BENCH_BASELINE) $(BENCH_ARGS)
	$(PY) bench/request_calls.py --baseline $(BENCH_BASELINE) $(BENCH_ARGS)
	$(PY) bench/gpu_step_time.py $(BENCH_ARGS) || [ $$? -eq 3 ]

# The GPU machine (python 3.12, torch, transformers, accelerate, pytest there; no internet) lacks
# these: fetched here as cp312 manylinux wheels into .whl/. .whl/ is git-ignored, so it does NOT
# travel with the tree: each device call must carry it (carry: [".whl"]; the carry limit is
# 64 MiB). bench/gpu_verify_on_device.sh installs them there (and stops, saying so, when .whl/ is
# missing) and runs one command of the proof (core, then extra: docs/PERFORMANCE.md).
GPU_WHEELS = diffusers==0.42.1 peft==0.21.2 torchao==0.18.0 pydantic==2.13.4 \
	pydantic-core==2.46.4 pydantic-settings==2.14.1 python-dotenv==1.2.2 annotated-types==0.7.0 \
	typing-inspection==0.4.2 typing-extensions==4.16.0 pytest-asyncio==1.5.0
GPU_WHEELS_MAX_KIB = 61440
WHEEL_PLATFORMS = --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(WHEEL_PLATFORMS) -d .whl $(GPU_WHEELS)
	@kib=$$(du -sk .whl | cut -f1); ls .whl; echo ".whl/: $$kib KiB (limit $(GPU_WHEELS_MAX_KIB))"; \
	if [ $$kib -gt $(GPU_WHEELS_MAX_KIB) ]; then echo "error: .whl/ is over 60 MiB" >&2; exit 1; fi

# Every stage of both commands on the CPU (tiny preset; compile with the aot_eager backend).
gpu-verify-dry-run:
	PYTHONPATH=src $(PY) bench/gpu_verify.py --dry-run --out build/gpu_verify_dry_run.jsonl
