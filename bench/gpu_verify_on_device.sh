#!/usr/bin/env bash
# The GPU proof on the GPU machine, from the repository root:
#   bash bench/gpu_verify_on_device.sh core     # ≤ 285 s: $OUT/gpu_verify_core.jsonl and .log
#   bash bench/gpu_verify_on_device.sh extra    # ≤ 255 s: $OUT/gpu_verify_extra.jsonl and .log
# Extra arguments go to gpu_verify.py (e.g. --budget-s 200). That machine has no internet: the
# packages it lacks (diffusers, peft, torchao, pydantic, ...) come as wheels in .whl/, which
# `make gpu-wheels` fills here. .whl/ is git-ignored, so it reaches the machine only when the
# device tool's call carries it (carry: [".whl"]); the project itself runs from src/.
set -euo pipefail
OUT=${OUT:-.}
GROUP=${1:-core}
shift || true
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_verify_on_device.sh: no wheels in .whl/ ($(pwd)/.whl): run \`make gpu-wheels\`" \
        "here and carry .whl with the device call (carry: [\".whl\"]); it is git-ignored" \
        "and does not travel with the tree by itself" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}"
# No internet there: a hub lookup would hang until its timeout instead of failing at once.
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 bench/gpu_verify.py --stages "$GROUP" --out "$OUT/gpu_verify_$GROUP.jsonl" "$@" 2>&1 \
    | tee "$OUT/gpu_verify_$GROUP.log"
