# The commands people and CI both run.
PY ?= python

.PHONY: install serve test lint format typecheck bench

install:
	pip install torch==2.13.0 -e '.[dev]'

serve:
	qwenserve serve

test:
	$(PY) -m pytest

lint:
	ruff check src tests bench
	ruff format --check src tests bench

format:
	ruff format src tests bench

typecheck:
	mypy

bench:
	$(PY) bench/engine_vs_diffusers.py
	$(PY) bench/server_overhead.py
	$(PY) bench/end_to_end.py
	$(PY) bench/batching.py
	$(PY) bench/memory.py
	$(PY) bench/queue_throughput.py
	$(PY) bench/encoding.py
	$(PY) bench/cpu_vae_norm.py
	$(PY) bench/cfg_batch.py
	$(PY) bench/gpu_step_time.py
