#!/usr/bin/env bash
# One GPU session for the attention kernel and attn_backend=auto (about 6 minutes on an H200, at most BUDGET s):
#   1. the GPU tests (kernel, custom ops with torch.compile, auto, model on GPU; -n 8) in the background, while
#   2. benchmarks/attention.py compiles our kernels for its shapes (the iGPT ones and the recipe's) in parallel
#      processes, waits for the tests to end, then times ours, SDPA flash and SDPA cuDNN in --repeats interleaved
#      rounds per shape (median and range), prints the ratios and what auto picks, and writes attention.json
#      and the auto table attention_table.json;
#   3. benchmarks/train_throughput.py: the igpt-s training step (DeepSpeed ZeRO-0, bf16, engine.compile()) with
#      attention triton, then auto, each in a fresh process with empty compile caches: compile time apart from
#      step time, graph breaks and Dynamo warnings; and the eager triton step beside it.
# Everything lands under $OUT as it is produced (7 files: tests.log, bench.log, attention.json,
# attention_table.json, compile.log, compile_triton.json, compile_auto.json), so a timeout keeps what finished.
# Needs the wheels of ../shared/wheels-device in .whl/ (carry it) for DeepSpeed: bash scripts/gpu_attention_check.sh --prepare
# SMOKE=1 runs the same plumbing on a CPU (the interpreter, igpt-tiny at 4x4, the table from the shipped H200
# report instead of timings; TESTS picks the tests): tests/test_gpu_attention_check.py.
set -uo pipefail
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl && cp ../shared/wheels-device/*.whl .whl/ && du -sh .whl
  exit
fi
OUT="${OUT:-out/gpu}"
BUDGET="${BUDGET:-540}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() {  # seconds for a phase: at most $1, and what the budget leaves after reserving $2
  local rest=$((BUDGET - SECONDS - ${2:-0}))
  echo $((rest < $1 ? (rest > 10 ? rest : 10) : $1))
}
DONE="$(mktemp -u /tmp/attn_tests_done.XXXX)"
if [ -n "${SMOKE:-}" ]; then
  TESTS="${TESTS:-tests/test_attention_auto.py}"
  BENCH=(--table-from benchmarks/results/attention_h200.json)
  STEP=(--device cpu --shapes igpt-tiny --batch 2 --resolution 4 --compile-cpu --warmup 1 --steps 1)
  XDIST=""
else
  TESTS="${TESTS:-tests/test_kernels_flash_attention.py tests/test_kernels_op.py tests/test_attention_auto.py tests/test_model_gpu.py}"
  BENCH=(--precompile 5 --wait-for "$DONE" --wait-limit 170 --deadline 260 --repeats 5)
  STEP=(--shapes igpt-s --warmup 3 --steps 10)
  XDIST="-n 8"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/bench.log"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/bench.log"

(
  # shellcheck disable=SC2086  # TESTS and XDIST are word lists
  timeout "$(left 170)" python3 -m pytest $TESTS -q -p no:cacheprovider -rs $XDIST >"$OUT/tests.log" 2>&1
  echo "tests exit: $?" >>"$OUT/tests.log"
  touch "$DONE"
) &
timeout "$(left 300 200)" python3 benchmarks/attention.py "${BENCH[@]}" --out "$OUT/attention.json" \
    --table "$OUT/attention_table.json" 2>&1 | tee -a "$OUT/bench.log"
echo "benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
wait
tail -3 "$OUT/tests.log"

for attn in triton auto; do  # fresh Inductor and Triton caches: each compile is a cold one
  ways=("ours_${attn}_compile")
  [ "$attn" = triton ] && ways+=(ours_triton)
  caches="$(mktemp -d /tmp/compile_caches.XXXX)"
  TORCHINDUCTOR_CACHE_DIR="$caches/inductor" TRITON_CACHE_DIR="$caches/triton" \
      timeout "$(left 200)" python3 benchmarks/train_throughput.py "${STEP[@]}" --ways "${ways[@]}" \
      --out "$OUT/compile_$attn.json" 2>&1 | tee -a "$OUT/compile.log"
  echo "train_throughput $attn exit: ${PIPESTATUS[0]}" | tee -a "$OUT/compile.log"
done
echo "wall: ${SECONDS} s"
