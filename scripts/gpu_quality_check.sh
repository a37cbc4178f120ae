#!/usr/bin/env bash
# One GPU session for the model-quality issue (about 12 minutes on one H100/H200, start-up included):
#   0. CIFAR-10 → k-means palette → 32x32 token shards (10% val; what the scorer reads) and the same split with the
#      train images stored at 36x36 (--margin 4: mirror-padded, for random 32x32 crops; val stays 32x32);
#   1. a PROBE_STEPS-step throughput probe of the recipe; train.steps is then sized to TRAIN_SECONDS (360) of
#      training at its steady tokens/s (STEPS=N skips the probe and trains N steps);
#   2. the GPU recipe (configs/cifar10-gpu-recipe.yaml: hflip + random crops) with logging.backend=jsonl, exported;
#   3. evals/score.py, without Ray or MLflow, on the exact 32x32 shards: val NLL on the whole val split, probes of
#      PROBE_LAYERS one by one and of PROBE_CONCAT concatenated (L2 chosen on 10% of train, the grid widened past
#      an edge), and raw pixels.
# Everything lands under $OUT (7 files): setup.log, train.log, config.yaml, metrics.jsonl, score.json, score.log
# and summary.md (the closing note's table row). Needs the same ignored folders as scripts/gpu_training_check.sh
# (.whl/ with ../shared/wheels-device, .gpu/ with cifar10-train.npz + unpack.py); prepare them with
#   bash scripts/gpu_training_check.sh --prepare
# On a CPU, at a tiny size (the test does this): SRC='DIR/*.tar' PALETTE=FILE LIMIT=600 DEVICE=cpu SKIP_INSTALL=1
#   EXTRA='model.n_layer=2 …' STEPS=4 PROBE_LAYERS=1 PROBE_CONCAT=0,1,2 bash scripts/gpu_quality_check.sh
set -uo pipefail
OUT="${OUT:-out/gpu-quality}"
WORK="${WORK:-/tmp/igpt-quality}"
CONFIG="${CONFIG:-configs/cifar10-gpu-recipe.yaml}"
RES="${RES:-32}"
MARGIN="${MARGIN:-4}"
DEVICE="${DEVICE:-cuda}"
TRAIN_SECONDS="${TRAIN_SECONDS:-360}"
PROBE_STEPS="${PROBE_STEPS:-40}"
PROBE_LAYERS="${PROBE_LAYERS:-4,5,6,7,8,9}"
PROBE_CONCAT="${PROBE_CONCAT:-5,6,7,8}"
read -r -a EXTRA <<<"${EXTRA:-}"  # more training overrides (key=value …)
PY="${PY:-python3}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/setup.log"  # at most 8 files come back: the GPU, install and data logs share one
SITE=""  # the dependency wheels; igpt itself comes from the checkout, which is not pip-installed
if [ -z "${SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  SITE="/tmp/site:"
fi
export PYTHONPATH="$SITE$PWD" PYTHONUNBUFFERED=1 DS_ACCELERATOR="${DS_ACCELERATOR:-$DEVICE}"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$LOG"
"$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$LOG"

if [ -z "${SRC:-}" ]; then  # the packed CIFAR-10 of .gpu/, unpacked once
  SRC="$WORK/cifar/cifar10-train-{000000..000009}.tar"
  [ -e "$WORK/cifar" ] || "$PY" .gpu/unpack.py .gpu/cifar10-train.npz "$WORK/cifar" >>"$LOG" 2>&1 || exit 1
fi
PALETTE="${PALETTE:-$WORK/palette.npy}"
DATA="$WORK/tokens$RES" MDATA="$WORK/tokens${RES}m$MARGIN"
SHARD=(--palette "$PALETTE" --resolution "$RES" --val-fraction 0.1 --shard-size 1000 ${LIMIT:+--limit "$LIMIT"}
       --class-names airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck)
{
  [ -f "$PALETTE" ] || "$PY" -m igpt palette fit --kind kmeans512 --source "$SRC" --resolution "$RES" \
      --max-images 10000 --out "$PALETTE"
  "$PY" -m igpt data shard "$SRC" --out "$DATA" "${SHARD[@]}"
  "$PY" -m igpt data shard "$SRC" --out "$MDATA" --margin "$MARGIN" "${SHARD[@]}"
} >>"$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
echo "data ready: $(tail -1 "$LOG")"

TRAIN=(-m igpt.pretrain.cli train "$CONFIG" "data.dir=$MDATA" "train.device=$DEVICE" logging.backend=jsonl "${EXTRA[@]}")
if [ -z "${STEPS:-}" ]; then  # steps for TRAIN_SECONDS at the probe's steady tokens/s (its first window is warm-up)
  "$PY" "${TRAIN[@]}" "train.run_dir=$WORK/probe" "train.steps=$PROBE_STEPS" train.log_every=10 \
      train.val_every=100000 train.sample_every=100000 checkpoint.every=100000 >>"$OUT/train.log" 2>&1 \
      || { tail -30 "$OUT/train.log"; exit 1; }
  STEPS=$("$PY" scripts/gpu_quality.py steps "$WORK/probe" "$TRAIN_SECONDS") || exit 1
fi
echo "training $STEPS steps" | tee -a "$OUT/train.log"
RUN="$WORK/run"
"$PY" "${TRAIN[@]}" "train.run_dir=$RUN" "train.steps=$STEPS" >>"$OUT/train.log" 2>&1 || { tail -30 "$OUT/train.log"; exit 1; }
"$PY" -m igpt.pretrain.cli export "$RUN" --out "$WORK/release" >>"$OUT/train.log" 2>&1 || { tail -30 "$OUT/train.log"; exit 1; }
cp "$RUN/config.yaml" "$OUT/config.yaml"
cp "$RUN/tracking/metrics.jsonl" "$OUT/metrics.jsonl"
grep -E "^step +[0-9]+/" "$OUT/train.log" | tail -3

"$PY" -m igpt.evals.score "$WORK/release" --data "$DATA" --layers "$PROBE_LAYERS" --concat "$PROBE_CONCAT" --raw-pixels \
    --device "$DEVICE" --json "$OUT/score.json" >"$OUT/score.log" 2>&1 || { tail -30 "$OUT/score.log"; exit 1; }
"$PY" scripts/gpu_quality.py summary "$OUT" | tee "$OUT/summary.md"
