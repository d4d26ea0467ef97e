#!/usr/bin/env bash
# Train the shipped default model `openkbp-hn-oar` from scratch, as it was trained (two stages), then
# evaluate it on the validation cases. About 3.6 hours on 2 CPU cores; add DEVICE=cuda on a GPU.
#   bash scripts/train-default-model.sh [RUN_FOLDER]        (default: runs/default-model)
# Stage 1: 3000 iterations of 2 x 96x64x96 patches from a fresh network (time-boxed to 110 min).
# Stage 2: from stage 1's weights, 112x64x128 patches (the inference window), learning rate 1e-3,
#          time-boxed to 105 min, the learning rate decaying to zero by the time limit.
# Both stages are cut by the clock on a slow machine, so a faster machine trains longer and better.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${UNETSEG_DATA:-../shared/data}/openkbp_hn_oar
PARTIAL=${UNETSEG_DATA:-../shared/data}/openkbp_hn_oar_partial
RUN=${1:-runs/default-model}
DEVICE=${DEVICE:-auto}
.venv/bin/unetseg train "$DATA" -o "$RUN/stage1" --recipe recipes/openkbp-hn-oar.json --device "$DEVICE" \
    --iterations 3000 --time-limit-min 110 --num-threads 2
.venv/bin/unetseg train "$DATA" -o "$RUN/stage2" --recipe recipes/openkbp-hn-oar.json --device "$DEVICE" \
    --init-from "$RUN/stage1/model" --patch-size 112,64,128 --learning-rate 1e-3 \
    --iterations 3000 --time-limit-min 105 --num-threads 2
.venv/bin/unetseg train "$DATA" -o "$RUN/stage3" --recipe recipes/openkbp-hn-oar.json --device "$DEVICE" \
    --init-from "$RUN/stage2/model" --extra-dataset "$PARTIAL" --val-fraction 0.13 \
    --sampling balanced --mirror-pairs RightParotid:LeftParotid --patch-size 112,64,128 \
    --learning-rate 1e-3 --iterations 6000 --time-limit-min 88 --val-every 500 --num-threads 2 \
    --version 1.2.0
.venv/bin/unetseg evaluate --model "$RUN/stage3/model" --dataset "$DATA" --cases validation \
    -o "$RUN/evaluation"
.venv/bin/unetseg evaluate --model "$RUN/stage3/model" --dataset "$PARTIAL" --cases validation \
    -o "$RUN/evaluation-partial"
echo "Model package: $RUN/stage3/model (install with: .venv/bin/unetseg import-model $RUN/stage3/model)"
