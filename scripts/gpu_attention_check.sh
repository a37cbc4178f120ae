#!/usr/bin/env bash
# One short GPU session for the attention kernel (about 150 s on an H200):
#   1. the kernel tests compiled on CUDA (GPU shapes included), in the background, while
#   2. benchmarks/attention.py --sweep compiles the backward candidates in parallel processes, waits for the
#      tests to end, times dKdV and dQ alone over a small config grid at (16,8,1024,64) and (16,8,1024,128)
#      (plus per-kernel / end-to-end / host-issue times with the defaults and the best), then runs the
#      five-shape benchmark against SDPA FlashAttention and cuDNN with the best configs.
# Writes gpu.txt, tests.log, bench.log and attention.json under $OUT (default ./out/gpu).
# Usage: bash scripts/gpu_attention_check.sh
set -uo pipefail
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DONE="$(mktemp -u /tmp/attn_tests_done.XXXX)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
(
  timeout "${TEST_TIMEOUT:-85}" python3 -m pytest tests/test_kernels_flash_attention.py -x -q -n 8 -p no:cacheprovider \
      >"$OUT/tests.log" 2>&1
  echo "tests exit: $?" >>"$OUT/tests.log"
  touch "$DONE"
) &
timeout "${BENCH_TIMEOUT:-158}" python3 benchmarks/attention.py --sweep --precompile 8 --wait-for "$DONE" \
    --deadline "${BENCH_DEADLINE:-138}" --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit: ${PIPESTATUS[0]}"
wait
tail -4 "$OUT/tests.log"
