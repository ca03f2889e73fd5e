#!/usr/bin/env bash
# The default texture basis the package ships (facedist/data/texture_basis_london_v1.npz): the
# default extraction (tddfa-fit, FaceBoxes) of the Face Research Lab London Set (DeBruine & Jones
# 2017, CC BY 4.0; 102 adults, neutral and smiling) with no basis, then `facedist texture fit`
# (80 components) on its texture samples. The same table gives the same bytes; a new basis needs
# a new file name (..._v2) and its sha256 pinned in facedist/assets.py.
# Usage: scripts/make_texture_basis.sh [LONDON_DIR]   (default: ../shared/data/london)
#        PYTHON (default .venv/bin/python), WORK (default /tmp/facedist-texture-basis)
set -euo pipefail
cd "$(dirname "$0")/.."
export FACEDIST_MODEL_DIR="${FACEDIST_MODEL_DIR:-$(cd .. && pwd)/shared/models}"
london="${1:-$(cd .. && pwd)/shared/data/london}"
PYTHON="${PYTHON:-.venv/bin/python}"
WORK="${WORK:-/tmp/facedist-texture-basis}"
out=facedist/data/texture_basis_london_v1.npz
mkdir -p "$WORK" "$(dirname "$out")"

# labels.csv is a manifest (path, subject, expression, ...); a rerun resumes.
"$PYTHON" -m facedist.cli extract "$london/labels.csv" --out "$WORK/london_nobasis" --texture-basis none
"$PYTHON" -m facedist.cli texture fit --data "$WORK/london_nobasis" --out "$out"
"$PYTHON" - "$out" <<'PY'
import sys
from pathlib import Path

from facedist import assets

path = Path(sys.argv[1])
got, pinned = assets.sha256_of(path), assets.MODEL_FILES[assets.DEFAULT_TEXTURE_BASIS_FILE].sha256
print(f"{path}: {path.stat().st_size} bytes, sha256 {got}")
print("matches the pin in facedist/assets.py" if got == pinned else f"differs from the pin in facedist/assets.py ({pinned})")
PY
