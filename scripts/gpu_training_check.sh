#!/usr/bin/env bash
# One GPU session for the training path (about 9 minutes on one H100/H200), in the order the issue asks:
#   0. CIFAR-10 → k-means palette → 32x32 token shards (10% val), and the no-host-sync test of the step;
#   1. benchmarks/recipe_vs_plain.py: the GPU recipe against ../shared/reference/plain_igpt.py, TOKENS each
#      (REF_TOKENS for the reference when time is short: then it reports throughput only);
#   2. benchmarks/train_throughput.py on igpt-s: the compiled plain loop against our step, eager and compiled;
#   3. benchmarks/precision_ablation.py GPU rows, with what time is left (ABLATION_STEPS).
# Everything lands under $OUT as it is produced (7 files). Needs, in ignored folders of the checkout (carry them):
#   .whl/  the wheels of ../shared/wheels-device;  .gpu/  cifar10-train.npz + unpack.py of
#   ../shared/data/cifar10-train-pack and plain_igpt.py of ../shared/reference.  Prepare with:
#   bash scripts/gpu_training_check.sh --prepare
set -uo pipefail
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl .gpu
  cp ../shared/wheels-device/*.whl .whl/
  cp ../shared/data/cifar10-train-pack/{cifar10-train.npz,unpack.py} ../shared/reference/plain_igpt.py .gpu/
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
  du -sh .whl .gpu
  exit 0
fi
OUT="${OUT:-out/gpu}"
WORK="${WORK:-/tmp/igpt-gpu}"
TOKENS="${TOKENS:-105e6}"
REF_TOKENS="${REF_TOKENS:-$TOKENS}"
mkdir -p "$OUT" "$WORK"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
LOG="$OUT/setup.log"  # at most 8 files come back: the GPU, data and no-sync logs share one
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$LOG"
python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$LOG"

SRC="$WORK/cifar/cifar10-train-{000000..000009}.tar"
DATA="$WORK/tokens32"
{
  python3 .gpu/unpack.py .gpu/cifar10-train.npz "$WORK/cifar"
  python3 -m igpt palette fit --kind kmeans512 --source "$SRC" --resolution 32 --max-images 10000 --out "$WORK/palette.npy"
  python3 -m igpt data shard "$SRC" --out "$DATA" --palette "$WORK/palette.npy" --resolution 32 --val-fraction 0.1 \
      --shard-size 1000 --class-names airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck
} >>"$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
echo "data ready: $(tail -1 "$LOG")"

timeout 180 python3 -m pytest tests/test_train_gpu.py -x -q -p no:cacheprovider >>"$LOG" 2>&1
echo "no-sync test exit: $?" | tee -a "$LOG"

# The recipe trains on flips and random crops of margin shards (issue 16); the comparisons with the plain loop
# and between precision modes use the same exact-size shards on both sides, unaugmented, as the reference reads.
NO_AUGMENT=(data.hflip=false data.random_crop=false)
REF_ARGS=()
[ "$REF_TOKENS" != "$TOKENS" ] && REF_ARGS=(--reference-tokens "$REF_TOKENS")
timeout "${RVP_TIMEOUT:-360}" python3 benchmarks/recipe_vs_plain.py --data "$DATA" --tokens "$TOKENS" "${REF_ARGS[@]}" \
    --reference .gpu/plain_igpt.py --out "$WORK/rvp" --json "$OUT/recipe_vs_plain.json" "${NO_AUGMENT[@]}" \
    2>&1 | tee "$OUT/recipe_vs_plain.log"
echo "recipe_vs_plain exit: ${PIPESTATUS[0]}" | tee -a "$OUT/recipe_vs_plain.log"

timeout "${TPUT_TIMEOUT:-150}" python3 benchmarks/train_throughput.py --data "$DATA" --shapes igpt-s \
    --ways plain plain_compile ours ours_compile --out "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log"
echo "train_throughput exit: ${PIPESTATUS[0]}" | tee -a "$OUT/train_throughput.log"

timeout "${ABLATION_TIMEOUT:-120}" python3 benchmarks/precision_ablation.py --data "$DATA" \
    --config configs/cifar10-gpu-recipe.yaml --steps "${ABLATION_STEPS:-300}" --eval-every "${ABLATION_STEPS:-300}" \
    --out "$WORK/ablation" --results "$OUT/precision_ablation_cuda.json" "${NO_AUGMENT[@]}" 2>&1
echo "ablation exit: $?"
