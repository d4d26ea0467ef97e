#!/usr/bin/env bash
# Set up (first run only) and segment a CT with the shipped default model (head & neck organs at risk).
#   bash scripts/segment.sh [INPUT_CT] [OUTPUT]
# INPUT_CT: a NIfTI/NRRD/MHA file or a DICOM series folder (default: a real OpenKBP validation scan from
# ../shared/data, or $UNETSEG_DATA). OUTPUT: .seg.nrrd (opens in 3D Slicer) or .nii.gz/.nrrd label map.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${UNETSEG_DATA:-../shared/data}
INPUT=${1:-$DATA/openkbp_hn_oar/imagesTr/pt_201_0000.nii.gz}
NAME=$(basename "$INPUT")
OUTPUT=${2:-out/${NAME%%.*}.seg.nrrd}
mkdir -p "$(dirname "$OUTPUT")"
.venv/bin/unetseg segment "$INPUT" -o "$OUTPUT"
