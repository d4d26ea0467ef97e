#!/usr/bin/env bash
# Train the second network of the shipped `openkbp-hn-oar-ensemble` and build the ensemble, as it was
# built: a fresh 3D U-Net with seed 1 and the left-right mirror augmentation, time-boxed to 120 min on
# 2 CPU cores (2311 iterations there), then averaged with the default model `openkbp-hn-oar`.
#   bash scripts/train-ensemble-model.sh [RUN_FOLDER]        (default: runs/ensemble-model)
# Add DEVICE=cuda on a GPU (the stage is time-boxed, so a faster machine trains more iterations).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${UNETSEG_DATA:-../shared/data}/openkbp_hn_oar
RUN=${1:-runs/ensemble-model}
DEVICE=${DEVICE:-auto}
.venv/bin/unetseg train "$DATA" -o "$RUN/seed1" --recipe recipes/openkbp-hn-oar.json --device "$DEVICE" \
    --model-id openkbp-hn-oar-seed1 --seed 1 --patch-size 112,64,128 \
    --mirror-pairs RightParotid:LeftParotid --iterations 4000 --time-limit-min 120 --num-threads 2
.venv/bin/unetseg ensemble "$RUN/seed1/model" openkbp-hn-oar -o "$RUN/ensemble" \
    --model-id openkbp-hn-oar-ensemble --half
.venv/bin/unetseg evaluate --model "$RUN/ensemble" --dataset "$DATA" --cases validation \
    -o "$RUN/evaluation"
