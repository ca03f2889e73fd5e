"""`facedist predict` throughput over a coefficients table: Ray Data with 1 and 2 actors, against
the plain loop of Recognizer.predict([row]) per row and the batched Recognizer.predict_many in
this process, in the same run.

The table is a given one (e.g. the London table) repeated to --rows rows (paths made distinct),
in parts of --batch-size rows. Each Ray run writes its own output; its rows/s is over the row
pass (actor start-up and model loading included, the Ray cluster's start not); its whole time
(models checked on the driver, outputs listed) is reported beside it.

    FACEDIST_MODEL_DIR=../shared/models .venv/bin/python benchmarks/predict_throughput.py \\
        --table TABLE --models MODELS --rows 10000

Writes JSON (default benchmarks/results/predict_throughput.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FACEDIST_MODEL_DIR", str(REPO.parent / "shared" / "models"))

from facedist import runtime, storage  # noqa: E402
from facedist.prediction.distributed import run_ray_prediction  # noqa: E402
from facedist.prediction.rows import PredictConfig, needed_columns, predict_rows, rows_from_arrow, table_parts  # noqa: E402
from facedist.recognition import Recognizer  # noqa: E402


def repeated_table(source: str, rows: int, batch: int, folder: Path) -> tuple[str, pa.Table]:
    """The source table (without its sampled texture) repeated to ``rows`` rows with distinct
    paths, written as parts of ``batch`` rows (layout kept); returns (folder, the table)."""
    table = pa.concat_tables([storage.read_table(p) for p in table_parts(source)], promote_options="default")
    table = table.drop_columns([c for c in ("texture",) if c in table.column_names])
    copies = []
    for k in range(-(-rows // table.num_rows)):
        paths = pa.array([f"{p}#{k}" for p in table.column("path").to_pylist()])
        copies.append(table.set_column(table.schema.get_field_index("path"), table.schema.field("path"), paths))
    big = pa.concat_tables(copies).slice(0, rows)
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, rows, batch)):
        storage.write_table(big.slice(start, batch), str(folder / f"part-bench-{i:05d}.parquet"))
    return str(folder), big


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help="coefficients table to repeat")
    parser.add_argument("--models", required=True, help="bundles (cnet/, identity/, gender/, expression/)")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=PredictConfig.batch_size)
    parser.add_argument("--loop-rows", type=int, default=1000, help="rows for the per-row loop baseline")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predict_throughput.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="predict_bench_"))
    load_before = os.getloadavg()
    try:
        table_uri, big = repeated_table(args.table, args.rows, args.batch_size, work / "table")
        recognizer = Recognizer.from_directory(args.models)
        rows = rows_from_arrow(big.select(needed_columns(recognizer, big.column_names)))
        import torch

        torch.set_num_threads(1)  # as one actor runs
        recognizer.predict_many([[rows[0]]])  # warm-up
        started = time.perf_counter()
        for row in rows[: args.loop_rows]:
            recognizer.predict([row])
        loop_rps = args.loop_rows / (time.perf_counter() - started)
        started = time.perf_counter()
        for start in range(0, len(rows), args.batch_size):
            predict_rows(recognizer, rows[start:start + args.batch_size])
        batched_rps = len(rows) / (time.perf_counter() - started)

        started = time.perf_counter()
        runtime.connect()
        ray_start = time.perf_counter() - started
        runs = {}
        for actors in (1, 2):
            out = work / f"out_{actors}"
            summary = run_ray_prediction(table_uri, str(out), PredictConfig(
                models=args.models, actors=actors, batch_size=args.batch_size, progress=False))
            run = summary["run"]
            assert summary["rows"] == args.rows and run["unaccounted"] == 0, summary
            runs[actors] = {"rows_out": summary["rows"], "rows_per_s": run["rows_per_s"],
                            "rows_seconds": run["rows_seconds"], "seconds": run["seconds"],
                            "resources": run["resources"]}
        runtime.disconnect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs[1]["rows_per_s"]
    result = {
        "table": args.table, "models": args.models, "rows": args.rows, "batch_size": args.batch_size,
        "in_process": {"per_row_loop_rows_per_s": round(loop_rps, 1), "loop_rows": args.loop_rows,
                       "predict_many_rows_per_s": round(batched_rps, 1),
                       "ratio_batched_vs_loop": round(batched_rps / loop_rps, 2)},
        "ray_start_seconds": round(ray_start, 2),
        "ray": {f"actors_{n}": r for n, r in runs.items()},
        "ratio_2_actors_vs_1": round(runs[2]["rows_per_s"] / base, 2),
        "ratio_1_actor_vs_in_process_loop": round(base / loop_rps, 2),
        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
