#!/usr/bin/env bash
# The Yale report's coefficient rows (identity, expression) with each face detector, side by side:
# extract Yale with FaceBoxes and with dlib's HOG (tddfa backend), then `facedist report
# --no-images --no-synthetic` on each table with the same seed. Writes docs/results/yale_detectors/.
# Usage: scripts/yale_detectors.sh [SEED]     (default: 0)
set -euo pipefail
cd "$(dirname "$0")/.."
export FACEDIST_MODEL_DIR="${FACEDIST_MODEL_DIR:-../shared/models}"
seed="${1:-0}"
detectors="${DETECTORS:-faceboxes dlib}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
out=docs/results/yale_detectors
mkdir -p "$out"
for detector in $detectors; do
  .venv/bin/facedist extract ../shared/data/yalefaces --out "$work/$detector" --detector "$detector" 2>/dev/null \
      | tee "$out/extract_$detector.txt"
  .venv/bin/facedist report --data "$work/$detector" --out "$out/${detector}_seed$seed" --seed "$seed" \
      --no-images --no-synthetic
done
