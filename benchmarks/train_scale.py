"""Training at 10k, 100k and 1M rows: synthetic tables with the real tables' spread, then load
and train figures per size (issue 26).

Tables (``make``): people x photos (10 each), written as Parquet parts of up to 50,000 rows in
the default schema (layout metadata of the first real table). Each descriptor group (id, exp,
tex, face embedding, expression feature, pooled feature) is drawn as
    mean + person offset + gender offset + expression offset + within-person noise
with the per-dimension between-person and within-person spreads measured on the real tables
(pooled over them), the gender offset from London's men vs women and the expression offsets
from Yale's six expressions (both on person-centred values). Every other column (landmarks,
pose, scores, the sampled texture, ...) is a random real row's. ``--texture-max`` rows: above it
the texture column is left null (the full schema at 1M rows would be ~13 GB, most of it the
8 KB-a-row texture sample; see docs/benchmarks.md).

Measures, each in a fresh process (peak RSS is per process):
  load   the shard path's loading as one process: the driver's plan (facedist.training.sharded
         plan_shards) + every read task (read_item) into the worker's matrices (load_shard) for
         gender (face embedding, 128 numbers), expression (its preset's groups, 858) and the 3DMM
         coefficients alone (id + exp + tex, 130): seconds, rows/s, peak RSS, and RSS beyond the
         matrices per row. Up to
         --inmemory-max rows also load_data(TRAINING_COLUMNS), the in-memory path.
  train  `facedist train --task T --workers W --epochs E --cpus-per-worker 1` on a local Ray:
         per-epoch training seconds (the slowest worker) and per 1,000 inputs, the epoch's wall
         time with validation, driver and per-worker peak RSS, total wall time.

    python benchmarks/train_scale.py make  --root /work/data/scale --rows 10000 100000 1000000
    python benchmarks/train_scale.py load  --root /work/data/scale --rows 10000
    python benchmarks/train_scale.py train --root /work/data/scale --rows 10000 --tasks gender expression identity --workers 1 2

JSON: benchmarks/results/train_scale.json (each run merges its entries in).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GROUPS = ("id_coeffs", "exp_coeffs", "tex_coeffs", "face_embedding", "expression_feature", "feature")
EXPRESSIONS = ("happy", "normal", "sad", "sleepy", "surprised", "wink")
PHOTOS = 10
PART_ROWS = 50_000
OUT = "benchmarks/results/train_scale.json"


# ------------------------------------------------------------------------------ statistics

def real_statistics(paths: list[str]) -> dict:
    """Per group: mean, between- and within-person std per dimension, gender and expression
    offsets (person-centred), from the real tables."""
    from facedist import storage

    tables = [storage.read_table(p, columns=["status", "subject", "gender", "expression", *GROUPS]) for p in paths]
    stats = {}
    for name in GROUPS:
        residuals, means, genders, exprs, rows = [], [], [], [], []
        for t, path in zip(tables, paths):
            ok = [s == "ok" and v is not None for s, v in zip(t.column("status").to_pylist(), t.column(name).to_pylist())]
            if not any(ok):
                continue
            x = np.asarray([v for v, k in zip(t.column(name).to_pylist(), ok) if k], np.float64)
            subject = np.asarray([f"{path}:{s}" for s, k in zip(t.column("subject").to_pylist(), ok) if k])
            gender = np.asarray([g for g, k in zip(t.column("gender").to_pylist(), ok) if k], dtype=object)
            expr = np.asarray([e for e, k in zip(t.column("expression").to_pylist(), ok) if k], dtype=object)
            for s in np.unique(subject):
                m = subject == s
                means.append(x[m].mean(0))
                genders.append(gender[m][0])
                if m.sum() > 1:
                    residuals.append(x[m] - x[m].mean(0))
                    exprs.extend(expr[m].tolist())
            rows.append(x)
        allx = np.concatenate(rows)
        residual = np.concatenate(residuals)
        dof = len(residual) - len(residuals)
        within = np.sqrt((residual ** 2).sum(0) / max(dof, 1))
        means = np.asarray(means)
        between = np.sqrt(np.maximum(means.var(0) - within ** 2 / 2, 1e-12))  # person means of ~2+ photos
        genders = np.asarray(genders, dtype=object)
        male, female = means[genders == "male"], means[genders == "female"]
        gender = (male.mean(0) - female.mean(0)) / 2 if len(male) and len(female) else np.zeros(allx.shape[1])
        exprs = np.asarray(exprs, dtype=object)
        expression = {e: residual[exprs == e].mean(0) for e in EXPRESSIONS if (exprs == e).any()}
        stats[name] = {"mean": allx.mean(0), "between": between, "within": within, "gender": gender,
                       "expression": expression,
                       "between_over_within": float(np.median(between / np.maximum(within, 1e-12)))}
    return stats


# ------------------------------------------------------------------------------ tables

def _list_column(x: np.ndarray):
    import pyarrow as pa

    n, d = x.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * d)
    return pa.ListArray.from_arrays(offsets, pa.array(x.astype(np.float32).ravel()))


def _rows(path: Path) -> int:
    """Rows of a complete Parquet file; -1 when missing or unreadable (a write cut short)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return -1


def make_table(stats: dict, source, rows: int, folder: Path, texture: bool, seed: int = 0) -> dict:
    """people x PHOTOS synthetic rows as Parquet parts under ``folder``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    people = rows // PHOTOS
    written, started = 0, time.perf_counter()
    for k, first in enumerate(range(0, people, PART_ROWS // PHOTOS)):
        persons = np.arange(first, min(people, first + PART_ROWS // PHOTOS))
        n = len(persons) * PHOTOS
        target = folder / f"part-{k:05d}.parquet"
        if _rows(target) == n:   # written by an earlier run that stopped (later parts draw afresh)
            written += n
            continue
        person = np.repeat(persons, PHOTOS)
        photo = np.tile(np.arange(PHOTOS), len(persons))
        male = np.random.default_rng([seed, 2]).random(people)[person] < 0.5
        part_rng = np.random.default_rng([seed, 3, k])   # this part's people's offsets
        expr = rng.integers(0, len(EXPRESSIONS), n)
        part = source.take(pa.array(rng.integers(0, source.num_rows, n)))
        columns = {
            "path": pa.array([f"synthetic/p{p:06d}/{i:02d}.jpg" for p, i in zip(person.tolist(), photo.tolist())]),
            "subject": pa.array([f"p{p:06d}" for p in person.tolist()]),
            "gender": pa.array(np.where(male, "male", "female").tolist()),
            "expression": pa.array([EXPRESSIONS[e] for e in expr.tolist()]),
            "status": pa.array(["ok"] * n), "message": pa.array([""] * n),
        }
        for name in GROUPS:
            s = stats[name]
            d = len(s["mean"])
            offsets = part_rng.standard_normal((len(persons), d))
            x = s["mean"] + (offsets * s["between"])[person - first] + np.where(male[:, None], 1, -1) * s["gender"]
            if s["expression"]:
                table = np.stack([s["expression"].get(e, np.zeros(d)) for e in EXPRESSIONS])
                x = x + table[expr]
            x = x + rng.standard_normal((n, d)) * s["within"]
            columns[name] = _list_column(x)
        for name, values in columns.items():
            part = part.set_column(part.schema.get_field_index(name), name, values.cast(part.schema.field(name).type))
        if not texture:
            i = part.schema.get_field_index("texture")
            part = part.set_column(i, "texture", pa.nulls(n, part.schema.field("texture").type))
        pq.write_table(part, target, compression="zstd")
        written += n
        del part, columns
    size = sum(f.stat().st_size for f in folder.glob("*.parquet"))
    return {"rows": written, "people": people, "photos_per_person": PHOTOS, "texture": texture,
            "bytes_on_disk": size, "bytes_per_row": size / max(written, 1), "seconds": time.perf_counter() - started}


def cmd_make(args) -> dict:
    from facedist import storage

    import pyarrow as pa
    import pyarrow.compute as pc

    stats = real_statistics(args.real)
    source = pa.concat_tables([storage.read_table(p) for p in args.real], promote_options="default")
    source = source.filter(pc.equal(source.column("status"), "ok"))
    out = {"spread": {name: {"between_over_within_median": s["between_over_within"],
                             "within_std_mean": float(s["within"].mean()),
                             "between_std_mean": float(s["between"].mean())} for name, s in stats.items()},
           "real": args.real, "tables": {}}
    for rows in args.rows:
        folder = Path(args.root) / f"rows{rows}"
        if sum(max(_rows(f), 0) for f in folder.glob("*.parquet")) == rows:
            print(f"{folder} exists, kept")
            continue
        info = make_table(stats, source, rows, folder, texture=rows <= args.texture_max)
        print(f"{rows} rows -> {folder}: {info['bytes_on_disk'] / 1e9:.2f} GB "
              f"({info['bytes_per_row'] / 1024:.1f} KB a row, texture {info['texture']}) in {info['seconds']:.0f} s",
              flush=True)
        out["tables"][str(rows)] = info
    return {"make": out}


# ------------------------------------------------------------------------------ load

_LOAD = r"""
import json, resource, sys, time
import pandas, pyarrow.compute  # noqa: F401  (imported before the clock starts: a run has them loaded)
kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from facedist.training import sharded
from facedist.training.data import TRAINING_COLUMNS, load_data
from facedist.training.presets import preset_config
uri, how, task = sys.argv[1], sys.argv[2], sys.argv[3]
inputs = tuple(sys.argv[4].split(",")) if len(sys.argv) > 4 else None   # None: the preset's
before = kb()
t = time.perf_counter()
if how == "shards":
    config = preset_config(task, data=uri, inputs=inputs)
    plan = sharded.plan_shards(config, 1)
    planned = time.perf_counter() - t
    batch = lambda item: {k: [v] for k, v in item.items()}
    arrays = sharded.load_shard((sharded.read_item(batch(i), plan.inputs, plan.widths) for i in plan.items[0]),
                                plan.meta(), 0)
    rows = sum(plan.n_train) + sum(plan.n_val)
    held = sum(a.nbytes for a in arrays)
    extra = {"plan_seconds": planned, "width": int(arrays[0].shape[1]), "inputs": list(plan.inputs)}
else:
    data = load_data(uri, columns=TRAINING_COLUMNS)
    rows, held, extra = len(data), 0, {}
seconds = time.perf_counter() - t
peak = kb()
print(json.dumps({"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_rss_mb": peak / 1024,
                  "rss_before_mb": before / 1024, "held_mb": held / 2**20,
                  "kb_per_row_beyond_held": ((peak - before) * 1024 - held) / 1024 / rows, **extra}))
"""


def _child(code: str, *argv: str, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cmd_load(args) -> dict:
    results = {}
    for rows in args.rows:
        uri = str(Path(args.root) / f"rows{rows}")
        entry = {}
        # The presets' inputs, and the 3DMM coefficients alone (α + β + τ, the paper's descriptor).
        for name, task, inputs in (("gender", "gender", ()), ("expression", "expression", ()),
                                   ("coefficients", "expression", ("id,exp,tex",))):
            m = _child(_LOAD, uri, "shards", task, *inputs)
            entry[f"shards_{name}"] = m
            print(f"{rows} rows, shards for {name} ({m['width']} numbers): {m['seconds']:.2f} s "
                  f"(plan {m['plan_seconds']:.2f}), {m['rows_per_s']:.0f} rows/s, peak RSS {m['peak_rss_mb']:.0f} MB, "
                  f"{m['kb_per_row_beyond_held']:.2f} KB a row beyond the {m['held_mb']:.0f} MB of inputs", flush=True)
        if rows <= args.inmemory_max:
            m = _child(_LOAD, uri, "in_memory", "-")
            entry["in_memory_training_columns"] = m
            print(f"{rows} rows, load_data(TRAINING_COLUMNS): {m['seconds']:.2f} s, {m['rows_per_s']:.0f} rows/s, "
                  f"peak RSS {m['peak_rss_mb']:.0f} MB", flush=True)
        results[str(rows)] = entry
    return {"load": results}


# ------------------------------------------------------------------------------ train

_TRAIN = r"""
import contextlib, io, json, resource, sys, time
import ray
from facedist import runtime
from facedist.cli import main
argv = json.loads(sys.argv[1])
# A local Ray of 2 CPUs of its own, as `facedist train` starts one (runtime.connect), but never a
# cluster another process left in /tmp/ray/ray_current_cluster.
ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=runtime._free_port(), runtime_env=runtime.runtime_env(True), log_to_driver=False)
buffer = io.StringIO()
t = time.perf_counter()
with contextlib.redirect_stdout(buffer):
    rc = main(argv)
wall = time.perf_counter() - t
text = buffer.getvalue()
summary = json.loads(text[text.index("{"):])
print(json.dumps({"rc": rc, "wall_seconds": wall, "summary": summary,
                  "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cmd_train(args) -> dict:
    import tempfile

    results = {}
    for rows in args.rows:
        uri = str(Path(args.root) / f"rows{rows}")
        for task in args.tasks:
            if task == "identity" and rows > args.identity_max:
                continue
            for workers in args.workers:
                with tempfile.TemporaryDirectory(dir=args.root) as out:
                    argv = ["train", "--task", task, "--data", uri, "--output", out, "--workers", str(workers),
                            "--cpus-per-worker", "1", "--epochs", str(args.epochs), "--no-gpu", "--json",
                            "--ingest", "shards"]
                    m = _child(_TRAIN, json.dumps(argv))
                history = m["summary"]["history"]
                epochs = [{"train_seconds": h["train_seconds"], "epoch_seconds": h.get("epoch_seconds"),
                           "train_inputs": h["train_inputs"],
                           "seconds_per_1000_inputs": 1000 * h["train_seconds"] / max(h["train_inputs"], 1),
                           "peak_rss_mb": h["peak_rss_mb"], "accuracy": h.get("accuracy"),
                           "refit": bool(h.get("refit"))} for h in history]
                entry = {"rows": rows, "task": task, "workers": workers, "command": "facedist " + " ".join(argv),
                         "wall_seconds": m["wall_seconds"], "driver_peak_rss_mb": m["driver_peak_rss_mb"],
                         "worker_peak_rss_mb": history[-1]["peak_rss_mb"], "epochs": epochs,
                         "n_val": history[-1].get("n_val"), "best": {k: v for k, v in m["summary"]["best"].items()
                                                                       if k not in ("confusion", "peak_rss_mb")}}
                results[f"{rows}/{task}/{workers}"] = entry
                last = epochs[-1]
                print(f"{rows} rows, {task}, {workers} worker(s): epoch {last['train_seconds']:.1f} s training "
                      f"({last['seconds_per_1000_inputs']:.3f} s per 1,000 inputs of {last['train_inputs']}), "
                      f"{last['epoch_seconds'] or float('nan'):.1f} s with validation; worker peak RSS "
                      f"{entry['worker_peak_rss_mb']} MB, driver {entry['driver_peak_rss_mb']:.0f} MB; "
                      f"{m['wall_seconds']:.0f} s in all", flush=True)
    return {"train": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("make", "load", "train"))
    parser.add_argument("--root", default="out/scale", help="where the tables go (outside the repo)")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--real", nargs="+", default=["/work/data/london3", "/work/data/yale3"],
                        help="real tables whose spread the synthetic ones take")
    parser.add_argument("--texture-max", type=int, default=100_000, help="rows up to which the texture is written")
    parser.add_argument("--inmemory-max", type=int, default=100_000, help="rows up to which load_data is measured")
    parser.add_argument("--tasks", nargs="+", default=["gender", "expression", "identity"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--identity-max", type=int, default=100_000, help="rows up to which identity trains")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    result = {"make": cmd_make, "load": cmd_load, "train": cmd_train}[args.what](args)
    path = Path(args.out)
    merged = json.loads(path.read_text()) if path.exists() else {}
    for key, value in result.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value if key != "make" else {**value, "tables": {**merged[key].get("tables", {}),
                                                                               **value["tables"]}})
        else:
            merged[key] = value
    merged.setdefault("runs", []).append({"command": " ".join(sys.argv), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "machine": platform.machine(), "cpus": os.cpu_count(),
                                          "loadavg": os.getloadavg()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, default=float))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
