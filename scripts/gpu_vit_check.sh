#!/usr/bin/env bash
# One GPU session for the patch-model issue: scripts/gpu_quality_check.sh (data, throughput probe sizing train.steps
# to TRAIN_SECONDS = 360 s, training, export, the Ray-free scorer on the exact 32x32 val split) with the patch recipe
# configs/cifar10-gpu-vit.yaml. Every variable of that script applies (CPU smoke mode included, see its header);
# the defaults here differ only in CONFIG, OUT and WORK.
export CONFIG="${CONFIG:-configs/cifar10-gpu-vit.yaml}" OUT="${OUT:-out/gpu-vit}" WORK="${WORK:-/tmp/igpt-vit}"
exec bash "$(dirname "$0")/gpu_quality_check.sh"
