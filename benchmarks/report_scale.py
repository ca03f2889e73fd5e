"""How long `facedist report --no-images` takes on a table of about 1,000 images with 14 per
person, and whether the same seed prints the same tables.

The table is synthetic (facedist.training.synthetic: 72 people x 14 images, Yale's expression
labels), written once as Parquet; the command is the CLI's own, run as a subprocess twice with
--seed 0 (the default settings: the task presets, 3 folds split by image, the synthetic C-Net
check included), so the timing is what a user waits.

    .venv/bin/python benchmarks/report_scale.py [--people 72] [--per-person 14] [--runs 2]

Writes benchmarks/results/report_scale.json: seconds per run, rows, the identity validation
inputs per fold, and whether every run's printed tables are equal to the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=72)
    parser.add_argument("--per-person", type=int, default=14)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "report_scale.json"))
    args = parser.parse_args()

    from facedist import storage
    from facedist.schema import YALE_EXPRESSIONS
    from facedist.training.synthetic import SyntheticConfig, synthetic_table

    work = Path(tempfile.mkdtemp(prefix="facedist-report-scale-"))
    table, _ = synthetic_table(SyntheticConfig(n_people=args.people, images_per_person=args.per_person, seed=0),
                               expressions=YALE_EXPRESSIONS)
    storage.write_table(table, str(work / "coeffs" / "part-0.parquet"))
    runs = []
    for run in range(args.runs):
        out = work / f"report-{run}"
        started = time.perf_counter()
        printed = work / f"report-{run}.txt"  # the command's output, per fold as it goes
        with printed.open("w") as sink:
            done = subprocess.run([sys.executable, "-m", "facedist.cli", "report", "--data", str(work / "coeffs"),
                                   "--out", str(out), "--seed", "0", "--no-images"],
                                  stdout=sink, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
        seconds = time.perf_counter() - started
        stdout = printed.read_text()
        if done.returncode != 0:
            print(stdout[-3000:])
            return 1
        # The tables as printed: everything from the first table row to the closing line, less the
        # per-fold progress lines and the seconds on the closing line.
        tables = [line for line in stdout.splitlines() if line.startswith(("|", "chance"))]
        results = json.loads((out / "results.json").read_text())
        runs.append({"seconds": round(seconds, 1), "tables": tables,
                     "identity_validation_inputs_per_fold": [f["identity_mean"]["n_val"]
                                                             for f in results["per_fold"]],
                     "summary": {k: v["accuracy"]["mean"] for k, v in results["summary"].items()
                                 if isinstance(v, dict) and "accuracy" in v}})
        print(f"run {run}: {seconds:.1f} s ({printed})", flush=True)
    report = {"rows": table.num_rows, "people": args.people, "per_person": args.per_person,
              "command": "facedist report --data TABLE --out OUT --seed 0 --no-images",
              "cpus": os.cpu_count(), "runs": [{k: v for k, v in r.items() if k != "tables"} for r in runs],
              "tables_identical": all(r["tables"] == runs[0]["tables"] for r in runs),
              "tables": runs[0]["tables"]}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "tables"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
