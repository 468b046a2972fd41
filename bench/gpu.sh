#!/usr/bin/env bash
# GPU figures (issue 16), at most ~8 minutes on an H200: the tests marked `cuda`, then the scoring and
# training benchmarks on paper-vit-b-32 on the GPU, then ONE JSON line with every figure and the issue's
# targets checked (bench/gpu_targets.py). On a machine without CUDA it says so and exits 0.
#
#     bash bench/gpu.sh                 # PYTHON=... to choose the interpreter (default: .venv's, else python3)
#     GPU_ROWS=20000 GPU_WORKERS=12 bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ROWS=${GPU_ROWS:-20000}                  # fashion-small has 20,193 products
WORKERS=${GPU_WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 4 : 1 ))}   # decode processes; the rest feed the GPU
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "bench/gpu.sh: $PYTHON cannot import torch: set PYTHON to the project's interpreter (make install)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA device on this machine: skipped (run it where a GPU is at hand)"
    echo '{"bench": "gpu", "skipped": true, "reason": "no CUDA device"}'
    exit 0
fi

LOGS=$(mktemp -d -t cmaclip-gpu-XXXX)
START=$SECONDS
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $LOGS/NAME.log, rc to NAME.rc
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    echo $? > "$LOGS/$name.rc"
    tail -n 4 "$LOGS/$name.log" | cut -c1-300
}

step cuda_tests 120 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/
step scoring 210 "$PYTHON" bench/scoring.py --device cuda --config paper-vit-b-32 --rows "$ROWS" \
    --rows-per-shard 10000 --batch-size 256 --workers "$WORKERS" --naive-rows 2048 --no-memory
step train_stages 90 "$PYTHON" bench/train_stages.py --device cuda --configs paper-vit-b-32 --micro-batch 256 \
    --paper-batches 4
step paper_batch 60 "$PYTHON" bench/train_stages.py --device cuda --configs paper-vit-b-32 --stages end_to_end \
    --micro-batch 1024 --paper-batches 1

"$PYTHON" bench/gpu_targets.py "$LOGS" --seconds $(( SECONDS - START ))
