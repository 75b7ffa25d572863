#!/usr/bin/env bash
# One GPU session's measurements and checks, in the order that keeps the figures if time runs
# out: the report, one process per op (the op against its baselines, with the
# launch-configuration sweeps; a CUDA error or a hang in one op cannot take the others'
# figures), the training step (fused against reference ops), then the op tests on the GPU
# (`pytest tests/ops`), which check what the report timed. Every step is bounded, and so is
# the whole: SESSION_SECONDS (default 540, for a 600 s call) caps each step at the time left,
# and a step that cannot start in time is skipped.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # default: benchmarks/results/session
#
# Writes eight files to OUT_DIR (a device call returns at most eight): report.txt (the card and
# versions, the build's and the reports' logs), gpu_report_<card>_<op>.json for each of the
# three ops, dispatch_table.json (the table refreshed from those reports), train_step.txt and
# tests.txt (the logs), and summary.txt (each step's exit status and seconds). Uses the machine's
# torch and triton (nothing is installed); PYTHONPATH is the checkout, which pacofr.kernels
# resolves from.
set -u
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/session}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # (a step killed at its limit keeps what it printed)
summary="$out/summary.txt"
: > "$summary"
deadline=$((SECONDS + ${SESSION_SECONDS:-540}))

step() {  # step LOG NAME SECONDS COMMAND...: runs it within min(SECONDS, time left), output to LOG.txt
    local log="$out/$1.txt" name=$2 limit=$3
    shift 3
    local left=$((deadline - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped, ${left} s left before the session's deadline" | tee -a "$summary"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    echo "== $name: $*" >> "$log"
    timeout -k 5 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$summary"
}

{
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python -c "import yaml" 2>/dev/null && echo "pyyaml: yes" || echo "pyyaml: no (train_step reads presets only)"
} > "$out/report.txt" 2>&1
# The C++ backend (csrc/), built in place against the machine's torch: the op tests and the CPU
# rows need it; a failed build leaves its log and the other steps run without it.
step report build_native 150 python setup.py -q build_ext --inplace
for op in masked_attention patch_pixel_loss codebook_topk; do
    step report "report $op" 120 python benchmarks/gpu_report.py --ops "$op" --out "$out"
done
# The dispatch table refreshed from this card's reports (the CUDA rows; the CPU rows stay).
step report "dispatch table" 20 bash -c "python benchmarks/dispatch_table.py $out/gpu_report_*.json && cp pacofr/ops/dispatch_table.json $out/"
step train_step train_step 90 python benchmarks/train_step.py --steps 8 --profile
# The op tests on the GPU, in the time left: everything under tests/ops but the compile-only
# check for sm_80/sm_90 (minutes of compiles that need no GPU; make test runs it).
step tests tests_ops 300 python -m pytest -q tests/ops --ignore=tests/ops/test_kernels_compile.py
