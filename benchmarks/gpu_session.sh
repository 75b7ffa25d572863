#!/usr/bin/env bash
# One GPU session's checks and measurements, in the order that keeps the figures if time runs
# out: the report (correctness on the GPU first, then every op against its baselines, with
# the launch-configuration sweeps), the training step (fused against reference ops), then
# the kernel tests on the GPU, each step bounded.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # default: benchmarks/results/session
#
# Writes six files to OUT_DIR (a device call returns at most eight): gpu.txt,
# gpu_report_<card>.json, report.txt, train_step.txt, tests.txt (the pytest logs) and
# summary.txt (each step's exit status). Uses the machine's torch and triton (nothing is
# installed); PYTHONPATH is the checkout, which pacofr.kernels resolves from.
set -u
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/session}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"

step() {  # step LOG NAME SECONDS COMMAND...: runs it with a time limit, appends its output to LOG.txt
    local log="$out/$1.txt" name=$2 limit=$3
    shift 3
    local t0=$SECONDS
    echo "== $name: $*" >> "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$summary"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt" 2>&1
step report report 240 python benchmarks/gpu_report.py --out "$out"
step train_step train_step 120 python benchmarks/train_step.py --steps 8 --profile
# Kernel tests on the GPU: compile-bound (each specialization compiles once), so in slices.
step tests test_loss 90 python -m pytest -q -x tests/test_patch_pixel_loss_kernel.py
step tests test_ops_loss 90 python -m pytest -q -x tests/test_ops.py -k patch_pixel
step tests test_attention 120 python -m pytest -q -x tests/test_masked_attention_kernel.py -k "d64 or 64"
step tests test_codebook 120 python -m pytest -q -x tests/test_codebook_topk_kernel.py -k "not 4099"
