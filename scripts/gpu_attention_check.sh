#!/usr/bin/env bash
# One short GPU session for the attention kernel (under 100 s on an H200):
#   1. the kernel tests compiled on CUDA (GPU shapes included, -x -q), in the background, while
#   2. benchmarks/attention.py compiles our kernels for the five issue shapes in parallel processes, waits for
#      the tests to end, then times ours, SDPA FlashAttention and SDPA cuDNN at each shape (TFLOP/s, errors,
#      host-issue time per forward+backward step) and prints the table of ratios.
# Everything lands under $OUT as it is produced (gpu.txt, tests.log, bench.log, attention.json rewritten after
# every shape), so a timeout still returns what finished.
# Usage: bash scripts/gpu_attention_check.sh
set -uo pipefail
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DONE="$(mktemp -u /tmp/attn_tests_done.XXXX)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
(
  timeout "${TEST_TIMEOUT:-60}" python3 -m pytest tests/test_kernels_flash_attention.py -x -q $XDIST -p no:cacheprovider \
      >"$OUT/tests.log" 2>&1
  echo "tests exit: $?" >>"$OUT/tests.log"
  touch "$DONE"
) &
timeout "${BENCH_TIMEOUT:-95}" python3 benchmarks/attention.py --precompile 5 --wait-for "$DONE" \
    --deadline "${BENCH_DEADLINE:-85}" --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
wait
tail -4 "$OUT/tests.log"
