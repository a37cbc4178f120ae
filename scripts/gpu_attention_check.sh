#!/usr/bin/env bash
# One GPU session for the attention kernel: the benchmark (with autotuning and its error checks at the iGPT
# shapes), then the kernel tests compiled on CUDA. Writes logs and JSON under $OUT (default ./out/gpu).
# Usage: bash scripts/gpu_attention_check.sh
set -uo pipefail
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-220}" python3 benchmarks/attention.py --autotune --precompile 14 --out "$OUT/attention.json" 2>&1 \
    | tee "$OUT/bench.log"
echo "benchmark exit: ${PIPESTATUS[0]}"
timeout "${TEST_TIMEOUT:-100}" python3 -m pytest tests/test_kernels_flash_attention.py -q -n 8 -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" | tail -25
echo "tests exit: ${PIPESTATUS[0]}"
