"""How fast a coefficients table loads for training, and what it costs in memory.

A real table (e.g. the default extraction of London) is repeated to N rows and written as Parquet
parts; each size is then read three ways, each in a fresh process (peak RSS is per process):
  * baseline: every column, then one Python object per row (table.to_pylist(): what the reader
    did before it converted columns whole)
  * all columns, converted by column (facedist.training.data.load_data)
  * the training columns only (load_data(columns=TRAINING_COLUMNS): no sampled texture)
JSON out: seconds, rows/s, peak RSS and its growth per row, and the ratios to the baseline.

    python benchmarks/load_table.py --data out/london --rows 10000 40000 --out benchmarks/results/load_table.json

What it does not show: Ray Train's sharding (each worker still reads the whole table), nor
tables wider than the default extraction's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from facedist import storage
from facedist.training.data import TRAINING_COLUMNS, load_data
uri, how = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if how == "rows":
    rows = storage.read_table(uri).to_pylist()
    n = len(rows)
else:
    data = load_data(uri, columns=TRAINING_COLUMNS if how == "training_columns" else None)
    n = len(data) + data.skipped
seconds = time.perf_counter() - t
print(json.dumps({"rows": n, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": before / 1024}))
"""


def _write_repeated(source: str, rows: int, folder: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facedist import storage

    table = storage.read_table(source)
    written, k = 0, 0
    while written < rows:
        take = table.slice(0, min(table.num_rows, rows - written))
        paths = pa.array([f"{p}#{k}" for p in take.column("path").to_pylist()])
        take = take.set_column(take.schema.get_field_index("path"), "path", paths)
        pq.write_table(take, folder / f"part-{k:05d}.parquet")
        written += take.num_rows
        k += 1
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a coefficients table to repeat")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--out", default="benchmarks/results/load_table.json")
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            uri = _write_repeated(args.data, rows, Path(tmp))
            entry = {"rows": rows}
            for how in ("rows", "all_columns", "training_columns"):
                out = subprocess.run([sys.executable, "-c", _CHILD, uri, how], capture_output=True, text=True, check=True)
                m = json.loads(out.stdout.strip().splitlines()[-1])
                m["rows_per_s"] = m["rows"] / m["seconds"]
                m["kb_per_row"] = (m["peak_rss_mb"] - m["rss_before_mb"]) * 1024 / m["rows"]
                entry[how] = m
                print(f"{rows} rows, {how}: {m['seconds']:.2f} s ({m['rows_per_s']:.0f} rows/s), "
                      f"peak RSS {m['peak_rss_mb']:.0f} MB ({m['kb_per_row']:.1f} KB per row)", flush=True)
            for how in ("all_columns", "training_columns"):
                entry[how]["speedup_vs_rows"] = entry["rows"]["seconds"] / entry[how]["seconds"]
            results.append(entry)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "machine": platform.machine(),
                                          "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                                          "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
