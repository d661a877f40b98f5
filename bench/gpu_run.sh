#!/usr/bin/env bash
# One GPU session, in order, within 8 minutes on an H100/H200 (issue 12):
#   1. exactness check: every backend vs a float64 stable sort, integer ties, L >= 2^20
#   2. mainloop gate: persistent Triton mainloop vs cuBLAS (>= 0.9x at N=4096, d=768, L=2^20)
#   3. quick bench: fused / binmax / gemm_filter vs cuBLAS matmul-only vs chunked torch
#   4. worker bench: forward, encode, end-to-end with Parquet (SmolLM2-135M shape, L=2^24)
# Everything is teed to $OUT (or bench/results/ when OUT is unset). Each stage has its own
# timeout, so one hang does not eat the others; the script's exit status is the first failure.
# Needs python3 with torch, triton, transformers, pyarrow; the package need not be installed.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/kernels:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # sae_harvest_kernels lives in kernels/
export TRITON_CACHE_AUTOTUNING=1  # stages 1 and 3 share compiled kernels and autotune picks
export TRITON_DEFAULT_FP_FUSION=1
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/bench/results}"
mkdir -p "$DEST"
CARD="$($PY -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "no-gpu")' 2>/dev/null || echo unknown)"
# The run's record (issue 12: bench/results/gpu-<card>-<date>.md): its command, then the output.
LOG="$DEST/gpu-$CARD-$(date +%Y-%m-%d-%H%M).md"
printf '# GPU run on %s\n\nCommand: `bash bench/gpu_run.sh` (`make bench-gpu`)\n\n```\n' "$CARD" > "$LOG"
status=0

stage() {  # stage <name> <timeout seconds> <command...>
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

{
    echo "gpu_run.sh at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
    $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee -a "$LOG"

stage exactness 130 $PY bench/gpu_exact.py
stage mainloop-gate 60 $PY bench/encode_gpu.py --mainloop-only --rep 50
stage quick-bench 190 $PY bench/encode_gpu.py --quick --rep 50 --write-table "$DEST/tuning_table.py"
stage worker 90 $PY bench/worker_gpu.py --shards 2
echo '```' >> "$LOG"
echo "record: $LOG (measured table, if any: $DEST/tuning_table.py; copy it to kernels/sae_harvest_kernels/ to commit it)"
exit $status
