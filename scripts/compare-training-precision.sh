#!/usr/bin/env bash
# Side by side on this machine: the same training recipe in float32 (contiguous tensors, as training
# ran before bf16 support) and in bf16 autocast with channels-last-3d, from the same fresh network and
# seed, for the same number of iterations. Prints iterations per second and the validation Dice of
# each, so speed and accuracy are compared at equal iterations.
#   bash scripts/compare-training-precision.sh [ITERATIONS] [RUN_FOLDER]   (default 300, runs/precision)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${UNETSEG_DATA:-../shared/data}/openkbp_hn_oar
N=${1:-300}
RUN=${2:-runs/precision}
mkdir -p "$RUN"
for precision in fp32 bf16; do
  .venv/bin/unetseg train "$DATA" -o "$RUN/$precision" --recipe recipes/openkbp-hn-oar.json \
      --model-id "precision-$precision" --device cpu --precision "$precision" --iterations "$N" \
      --val-every "$N" --num-threads 2 > "$RUN.$precision.log" 2>&1 || { cat "$RUN.$precision.log"; exit 1; }
  rate=$(grep -o '[0-9.]* it/s' "$RUN.$precision.log" | awk '{s += $1; n++} END {printf "%.3f", s / n}')
  dice=$(grep -o 'mean Dice [0-9.]*' "$RUN.$precision.log" | tail -1)
  echo "$precision: $rate it/s (mean of the 25-iteration rates), $dice after $N iterations"
done
