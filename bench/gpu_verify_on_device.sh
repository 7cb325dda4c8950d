#!/usr/bin/env bash
# The GPU proof on the GPU machine, from the repository root, with .whl/ carried there
# (`make gpu-wheels` fills it here). That machine has no internet: the wheels hold what it
# lacks (diffusers, peft, torchao, pydantic, ...); the project itself runs from src/.
# Extra arguments go to gpu_verify.py (e.g. --stages compile --budget-s 300).
set -euo pipefail
OUT=${OUT:-.}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
python3 bench/gpu_verify.py --out "$OUT/gpu_verify.jsonl" "$@" 2>&1 | tee "$OUT/gpu_verify.log"
