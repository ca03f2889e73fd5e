#!/usr/bin/env bash
# Regenerates the figures README.md, docs/results.md and docs/benchmarks.md show, each with the command
# they name for it (benchmarks/cuda_check.py, extract_cost.py and face_descriptor_check.py run by hand).
# Hours on 2 cores in all; pick parts by name:
#   scripts/figures.sh [PART ...]      (default: every part, in this order)
# Parts: quickstart yale_full london_models yale_models london expression_trials yale_person cnet_degraded
#        detectors extract_single embedding gallery_search
#        box_calibration extract_ray default_speed train_speed report_scale serve_load fault_recovery
#        faceapi_check london_age
# (cuda_check needs a GPU and an extracted table: benchmarks/cuda_check.py --table TABLE.)
# Outputs: docs/results/* (reports) and benchmarks/results/*.json (benchmarks); the work
# folders (extracted tables, run outputs) go under $WORK (default: /tmp/facedist-figures).
set -euo pipefail
cd "$(dirname "$0")/.."
export FACEDIST_MODEL_DIR="${FACEDIST_MODEL_DIR:-$(cd .. && pwd)/shared/models}"
DATA="$(cd .. && pwd)/shared/data"
WORK="${WORK:-/tmp/facedist-figures}"
BIN=.venv/bin
mkdir -p "$WORK"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(quickstart yale_full london_models yale_models london expression_trials yale_person
                               cnet_degraded detectors embedding gallery_search
                               extract_single box_calibration extract_ray default_speed train_speed report_scale
                               serve_load fault_recovery faceapi_check london_age)
step() { printf '\n== %s: %s\n' "$1" "$2"; }

extracted() {  # extracted NAME IMAGES: the default extraction of IMAGES into $WORK/NAME (a rerun resumes)
  "$BIN/facedist" extract "$2" --out "$WORK/$1"
}

for part in "${parts[@]}"; do
  case "$part" in
    quickstart)  # docs/results.md: the quick start and its report (docs/results/yale)
      step "$part" "facedist run --images yalefaces (then copied to docs/results/yale)"
      rm -rf "$WORK/quickstart"
      /usr/bin/time -f "%e s" "$BIN/facedist" run --images "$DATA/yalefaces" --out "$WORK/quickstart" \
          2>&1 | tee "$WORK/quickstart.log"
      rm -rf docs/results/yale && cp -r "$WORK/quickstart/report" docs/results/yale
      cp "$WORK/quickstart.log" docs/results/yale/run_output.txt ;;
    yale_full)   # docs/results.md: the same protocol with the image baseline (ResNet-34, 224 px)
      step "$part" "facedist report on the quick start's table, images included"
      "$BIN/facedist" report --data "$WORK/quickstart/coefficients" --out docs/results/yale_full ;;
    london_models)  # docs/results.md: the shipped models, heads and descriptors on unseen people (London)
      step "$part" "facedist report --protocol person on London: every head (the shipped one on 5 seeds, the others on 1), no image baseline"
      extracted london "$DATA/london/labels.csv"
      "$BIN/facedist" report --protocol person --data "$WORK/london" --out docs/results/london_models \
          --no-images --heads linear,mlp,resnet --model-seeds 1 ;;
    yale_models)    # docs/results.md: the same on Yale
      step "$part" "facedist report --protocol person --gallery normal on Yale: every head, as London's"
      extracted yale "$DATA/yalefaces"
      "$BIN/facedist" report --protocol person --gallery normal --data "$WORK/yale" --out docs/results/yale_models \
          --no-images --heads linear,mlp,resnet --model-seeds 1 ;;
    london)      # docs/results.md: London, split by person
      step "$part" "facedist report --protocol person on London"
      extracted london "$DATA/london/labels.csv"
      "$BIN/facedist" report --protocol person --data "$WORK/london" --out docs/results/london --heads '' ;;
    expression_trials)  # docs/results.md: other descriptors for London's expression row
      step "$part" "scripts/expression_trials.py on London"
      extracted london "$DATA/london/labels.csv"
      "$BIN/python" scripts/expression_trials.py --data "$WORK/london" --out docs/results/london ;;
    yale_person) # docs/results.md: Yale, split by person
      step "$part" "facedist report --protocol person --gallery normal on Yale"
      extracted yale "$DATA/yalefaces"
      "$BIN/facedist" report --protocol person --gallery normal --data "$WORK/yale" --out docs/results/yale_person \
          --heads '' ;;
    embedding)   # docs/results.md: the gallery's embedding on people never seen in training
      step "$part" "scripts/embedding_report.py on London and Yale"
      extracted london "$DATA/london/labels.csv"
      extracted yale "$DATA/yalefaces"
      "$BIN/python" scripts/embedding_report.py --data "$WORK/london" --gallery neutral --out docs/results/embedding/london
      "$BIN/python" scripts/embedding_report.py --data "$WORK/yale" --gallery normal --out docs/results/embedding/yale ;;
    gallery_search)  "$BIN/python" benchmarks/gallery_search.py ;;
    cnet_degraded)   "$BIN/python" benchmarks/cnet_degraded.py --seeds 5 ;;
    detectors)       scripts/yale_detectors.sh 0 ;;
    extract_single)  "$BIN/python" benchmarks/extract_single.py ;;
    box_calibration) "$BIN/python" benchmarks/box_calibration.py --data "$DATA/yalefaces" "$DATA/london" ;;
    extract_ray)     "$BIN/python" benchmarks/extract_ray.py --n 2000 --repeats 2 ;;
    default_speed)   "$BIN/python" benchmarks/default_backend_speed.py ;;
    train_speed)     extracted yale "$DATA/yalefaces"
                     "$BIN/python" benchmarks/train_speed.py --data "$WORK/yale" \
                         --out benchmarks/results/train_speed.json ;;
    report_scale)    "$BIN/python" benchmarks/report_scale.py ;;
    serve_load)      "$BIN/python" benchmarks/serve_load.py ;;
    fault_recovery)  "$BIN/python" benchmarks/fault_recovery.py ;;
    faceapi_check)   "$BIN/python" benchmarks/faceapi_check.py --london "$DATA/london" --yale "$DATA/yalefaces" ;;
    london_age)      # docs/results.md: age on London, split by person (a table of schema 2: it has the age label)
      step "$part" "scripts/age_by_person.py on London"
      extracted london_age "$DATA/london/labels.csv"
      "$BIN/python" scripts/age_by_person.py --data "$WORK/london_age" --out docs/results/london_age ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
