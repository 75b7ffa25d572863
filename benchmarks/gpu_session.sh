#!/usr/bin/env bash
# One GPU session's checks and measurements, in the order that keeps the figures if time runs
# out: the report (correctness on the GPU first, then every op against its baselines, with
# the launch-configuration sweeps), then the kernel tests on the GPU, each step bounded.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # default: benchmarks/results/session
#
# Writes OUT_DIR/gpu_report_<card>.json, report.txt, the pytest logs and a summary
# of each step's exit status. Uses the machine's torch and triton (nothing is installed);
# PYTHONPATH is the checkout, which pacofr.kernels resolves from.
set -u
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/session}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: runs it with a time limit, logs its output and status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$summary"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt" 2>&1
step report 240 python benchmarks/gpu_report.py --out "$out"
# Kernel tests on the GPU: compile-bound (each specialization compiles once), so in slices.
step test_loss 90 python -m pytest -q -x tests/test_patch_pixel_loss_kernel.py
step test_ops_loss 90 python -m pytest -q -x tests/test_ops.py -k patch_pixel
step test_attention 120 python -m pytest -q -x tests/test_masked_attention_kernel.py -k "d64 or 64"
step test_codebook 120 python -m pytest -q -x tests/test_codebook_topk_kernel.py -k "not 4099"
