"""The extraction job on Ray Data: the thin adapter around facedist.extraction.rows' row functions.

Stages (streamed, so millions of inputs never sit in memory at once):

    driver:  list inputs (prefix or manifest) -> records -> ray.data.from_items
    tasks:   read_row + content hash -> mark rows already in the output (resume) -> decode_row
    actors:  extract_rows (models loaded once per actor) -> one Parquet part per batch
    driver:  count statuses as parts land -> output.summarize writes _summary.json

Parts are named after the batch's (path, hash) keys, so a batch that is retried after its actor
died rewrites the same part instead of adding a second copy: rows in = rows out, exactly.
Ray itself is started (or joined) by facedist.runtime.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from facedist import runtime, storage
from facedist.extraction.config import ExtractConfig
from facedist.extraction.output import PART_PREFIX, prepare_output, remove_set_aside, summarize, write_previews
from facedist.extraction.rows import decode_row, discover_records, extract_rows, read_row, record_row
from facedist.extractors.base import Extractor
from facedist.progress import progress_bar
from facedist.schema import COEFFICIENTS_SCHEMA, LABEL_COLUMNS, STATUS_ERROR, STATUSES, rows_to_table

# Rows between the read/decode tasks and the extraction actors: decoded pixels travel as raw
# bytes + shape, which avoids Arrow's variable-shape tensor columns (and their null handling).
DECODED_SCHEMA = pa.schema(
    [pa.field("path", pa.string()), pa.field("content_hash", pa.string()),
     pa.field("status", pa.string()), pa.field("message", pa.string())]
    + [COEFFICIENTS_SCHEMA.field(name) for name in LABEL_COLUMNS]
    + [pa.field("pixels", pa.large_binary()), pa.field("height", pa.int32()), pa.field("width", pa.int32()),
       pa.field("storage_stats", pa.string())]
)
# Internal status of rows whose (path, hash) is already in the output: counted, not extracted.
SKIPPED = "skipped"
# What the actors hand back to the driver: enough to count, not the coefficients themselves.
# extract_seconds: the actor's time on the row's batch, shared out over its rows (for utilisation).
# storage_stats (both schemas): the S3 counts (storage.stats_since) of the batch's reads and
# writes as JSON, on its first row only, so the driver can add them up for the summary.
RESULT_SCHEMA = pa.schema([pa.field("path", pa.string()), pa.field("status", pa.string()),
                           pa.field("part", pa.string()), pa.field("extract_seconds", pa.float64()),
                           pa.field("storage_stats", pa.string())])


@dataclass
class RayExtractConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    actors: int = 2                      # extraction actors (each loads the models once)
    actor_num_cpus: float | None = None  # None: share the cluster's CPUs, leaving room for decoding
    actor_num_gpus: float | None = None  # None: 1 per actor when the cluster has GPUs, else 0
    decode_num_cpus: float = 0.25        # per read/decode task
    rows_per_block: int | None = None    # input block size; None: the extraction batch size
    torch_threads: int | None = None     # per actor; None: its CPU share, at least 1
    dataset: str = "auto"                # how labels are read from file names
    # Progress while it runs: facedist's own bar on stderr (Ray Data's bars with --verbose).
    progress: bool = True
    # Builds the extractor inside each actor instead of make_extractor(backend, ...): a hook for
    # custom backends and for plumbing tests. Must be picklable (cloudpickle).
    extractor_factory: Callable[[ExtractConfig], Extractor] | None = None


# ---- inputs ------------------------------------------------------------------------------------


# ---- stage 1: read + decode (Ray tasks) ----------------------------------------------------------

def read_decode_batch(batch: pa.Table, *, options: storage.S3Options | None, max_side: int,
                      done: frozenset) -> pa.Table:
    """rows.read_row + decode_row over a block. Rows already in the output (same path and
    content hash) are marked SKIPPED and carry no pixels."""
    before = storage.stats_snapshot()
    columns: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    for row in batch.to_pylist():
        row = read_row(row, options)
        if (row["path"], row.get("content_hash")) in done:
            # Kept (without pixels) so the driver can account for every input row.
            row.update(bytes=None, status=SKIPPED, message="already in the output")
        row = decode_row(row, max_side)
        image = row.pop("image")
        row["pixels"] = None if image is None else image.tobytes()
        row["height"], row["width"] = (None, None) if image is None else image.shape[:2]
        for name in DECODED_SCHEMA.names:
            columns[name].append(row.get(name))
    columns["storage_stats"] = _stats_column(storage.stats_since(before), len(columns["path"]))
    return pa.Table.from_pydict(columns, schema=DECODED_SCHEMA)


def _stats_column(stats: Counter, rows: int) -> list:
    return [storage.stats_json(stats)] + [None] * (rows - 1) if rows else []


def _decoded_rows(batch: pa.Table) -> list[dict]:
    rows = batch.to_pylist()
    for row in rows:
        pixels = row.pop("pixels")
        row["image"] = (None if pixels is None else
                        np.frombuffer(pixels, dtype=np.uint8).reshape(row["height"], row["width"], 3))
        if not row.get("status"):
            row.pop("status", None)
    return rows


def part_name(run_id: str, rows: Sequence[dict]) -> str:
    """A part named after its rows' keys: a retried batch overwrites its own part."""
    digest = hashlib.sha1("\n".join(f"{r['path']}\t{r.get('content_hash')}" for r in rows).encode())
    return f"{PART_PREFIX}{run_id}-{digest.hexdigest()[:16]}.parquet"


# ---- stage 2: extraction (Ray actors) ----------------------------------------------------------

class ExtractActor:
    """Loads the extractor once; each call extracts one batch and writes it as one Parquet part."""

    def __init__(self, config: ExtractConfig, out_uri: str, options: storage.S3Options | None,
                 run_id: str, torch_threads: int, preview_budget: int = 0,
                 extractor_factory: Callable[[ExtractConfig], Extractor] | None = None):
        import torch

        # Two actors on two cores each running a multi-threaded torch would fight over the cores.
        torch.set_num_threads(max(1, torch_threads))
        try:
            import cv2
            cv2.setNumThreads(max(1, torch_threads))
        except ImportError:
            pass
        self.config, self.out_uri, self.options, self.run_id = config, out_uri, options, run_id
        self.extractor = (extractor_factory(config) if extractor_factory is not None else
                          config.build_extractor(detect_threads=config.detect_threads or max(1, torch_threads)))
        self.preview_budget = preview_budget

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        before = storage.stats_snapshot()
        stats: Counter = Counter()
        storage.add_stats_json(stats, batch.column("storage_stats").to_pylist())  # the decode tasks' reads
        rows = _decoded_rows(batch.drop_columns(["storage_stats"]))
        skipped = [r["path"] for r in rows if r.get("status") == SKIPPED]
        rows = [r for r in rows if r.get("status") != SKIPPED]
        finished, name = [], None
        if rows:
            finished, results = extract_rows(rows, self.extractor)
            name = part_name(self.run_id, finished)
            storage.write_table(rows_to_table(finished, self.extractor.layout),
                                storage.join(self.out_uri, name), self.options)
            if self.preview_budget > 0:
                self.preview_budget -= write_previews(rows, results, self.out_uri, self.preview_budget,
                                                       self.options)
        share = (time.perf_counter() - started) / max(1, len(finished) + len(skipped))
        stats.update(storage.stats_since(before))
        return pa.Table.from_pydict({"path": [r["path"] for r in finished] + skipped,
                                     "status": [r["status"] for r in finished] + [SKIPPED] * len(skipped),
                                     "part": [name] * len(finished) + [None] * len(skipped),
                                     "extract_seconds": [share] * (len(finished) + len(skipped)),
                                     "storage_stats": _stats_column(stats, len(finished) + len(skipped))},
                                    schema=RESULT_SCHEMA)


# ---- the job -------------------------------------------------------------------------------------

def plan_resources(config: RayExtractConfig, cluster: dict) -> dict:
    """CPU/GPU per actor and threads, from the cluster's resources."""
    cpus = float(cluster.get("CPU", 1.0))
    gpus = float(cluster.get("GPU", 0.0))
    actors = max(1, config.actors)
    num_gpus = config.actor_num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= actors else (gpus / actors if gpus else 0.0)
    device = config.extract.device
    if num_gpus > 0 and device == "cpu":
        device = "cuda"
    num_cpus = config.actor_num_cpus
    if num_cpus is None:
        # Leave a quarter of the cluster (at least one decode task's share) to the read/decode tasks:
        # with every CPU held by actors, Ray Data could not schedule a decode task and would stall.
        free = max(cpus - max(config.decode_num_cpus, 0.25 * cpus), 0.1)
        num_cpus = min(1.0, free / actors)
    threads = config.torch_threads or max(1, int(num_cpus))
    return {"num_cpus": round(num_cpus, 3), "num_gpus": num_gpus, "device": device, "torch_threads": threads}


def run_ray_extraction(inputs, out_uri: str, config: RayExtractConfig | None = None, address: str | None = None,
                       options: storage.S3Options | None = None) -> dict:
    """Extract every input image into Parquet parts under out_uri on Ray Data; returns the summary
    (also written to out_uri/_summary.json). inputs: a folder / s3:// prefix, a CSV/Parquet
    manifest, or a list of ImageRecords or paths."""
    config = config or RayExtractConfig()
    options = options or storage.S3Options.from_env()
    out_uri = storage.absolute(out_uri)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = storage.absolute(str(inputs))
    started = time.perf_counter()
    driver_before = storage.stats_snapshot()
    ray = runtime.connect(address)
    ray_ready = time.perf_counter()

    records = discover_records(inputs, config.dataset, options)
    # Resume: the output's settings are checked (on this process's CPU) before any work is sent out;
    # without resume the parts already there are set aside, deleted once this run has written its own.
    on_cpu = ExtractConfig(**{**asdict(config.extract), "device": "cpu"})
    factory = config.extractor_factory
    done, _, _ = prepare_output(out_uri, on_cpu, options, build=(lambda: factory(on_cpu)) if factory else None)
    done = frozenset(done)
    plan = plan_resources(config, ray.cluster_resources())
    extract_config = ExtractConfig(**{**asdict(config.extract), "device": plan["device"]})
    run_id = uuid.uuid4().hex[:8]

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.progress and runtime.verbose()
    bar = progress_bar("images") if config.progress and not runtime.verbose() else None
    ctx.verbose_stats_logs = False
    results = {s: 0 for s in (*STATUSES, SKIPPED)}
    parts: set[str] = set()
    busy = 0.0
    first_result = None
    workers_stats: Counter = Counter()
    if records:
        batch_size = max(1, extract_config.batch_size)
        rows = [record_row(r) for r in records]
        block_rows = max(1, config.rows_per_block or batch_size)
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / block_rows)))
        ds = ds.map_batches(read_decode_batch, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"options": options, "max_side": extract_config.max_side, "done": done},
                            num_cpus=config.decode_num_cpus)
        ds = ds.map_batches(
            ExtractActor, batch_format="pyarrow", batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=max(1, config.actors)),
            num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"] or None,
            fn_constructor_kwargs={"config": extract_config, "out_uri": out_uri, "options": options,
                                   "run_id": run_id, "torch_threads": plan["torch_threads"],
                                   "preview_budget": math.ceil(extract_config.preview / max(1, config.actors)),
                                   "extractor_factory": config.extractor_factory})
        failure = None
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if first_result is None:  # start-up cost: cluster, actors, models, the first batch
                    first_result = time.perf_counter() - started
                for status in batch.column("status").to_pylist():
                    results[status if status in results else STATUS_ERROR] += 1
                parts.update(p for p in batch.column("part").to_pylist() if p)
                busy += sum(batch.column("extract_seconds").to_pylist())
                storage.add_stats_json(workers_stats, batch.column("storage_stats").to_pylist())
                if bar is not None:
                    bar(sum(results.values()), len(records))
        except Exception as exc:
            failure = storage.find_store_failure(exc)
            if failure is None:
                raise
        if failure is not None:
            # The failed dataset's actors live until it is collected: free them now, so none is
            # left to write once the store is back and a rerun has listed what is done.
            del ds
            gc.collect()
            # One clear line (not Ray's nested tracebacks): which URI, and what this run had written.
            raise storage.StoreUnavailableError(failure.uri, f"{failure} (this run had written {len(parts)} "
                                                             f"part(s) before it stopped)")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    skipped = results.pop(SKIPPED)
    written = sum(results.values())
    lost = len(records) - written - skipped
    if lost:  # must never happen; said loudly rather than hidden in a count
        print(f"facedist extract: WARNING {lost} input rows unaccounted for", file=sys.stderr)
    elif not config.extract.resume:  # --no-resume: the previous rows go once this run's are all written
        remove_set_aside(out_uri, options)
    run = {"inputs": len(records), "written": written, "skipped": skipped, "unaccounted": lost,
           "this_run_counts": results, "parts_written": len(parts),
           "seconds": round(seconds, 3), "actor_busy_seconds": round(busy, 3),
           # Share of the actors' wall time spent extracting: low means they waited on input.
           "actor_utilisation": round(busy / (seconds * max(1, config.actors)), 3) if seconds else None,
           "first_result_seconds": round(first_result, 3) if first_result is not None else None,
           "ray_init_seconds": round(ray_ready - started, 3),
           "images_per_s": round(written / seconds, 3) if seconds else None,
           "config": _config_json(config), "resources": plan, "mode": "ray-data", "run_id": run_id,
           # S3 operations, retries per error kind, give-ups: the workers' and this driver's.
           "storage": storage.stats_report(workers_stats + storage.stats_since(driver_before))}
    summary = summarize(out_uri, options, run=run)
    print(one_line_summary(summary, out_uri), file=sys.stderr, flush=True)
    return summary


def _config_json(config: RayExtractConfig) -> dict:
    data = asdict(config)
    factory = data.pop("extractor_factory")
    if factory is not None:
        data["extractor_factory"] = getattr(factory, "__qualname__", repr(factory))
    return data


def one_line_summary(summary: dict, out_uri: str) -> str:
    counts, run = summary["counts"], summary.get("run", {})
    layout = summary.get("layout") or {}
    return (f"facedist extract: {summary['rows']} rows in {out_uri} (ok {counts.get('ok', 0)}, "
            f"no_face {counts.get('no_face', 0)}, error {counts.get('error', 0)}); this run "
            f"{run.get('written')} written, {run.get('skipped')} skipped, {run.get('seconds')} s, "
            f"{run.get('images_per_s')} img/s; model {layout.get('model_name', '?')} {layout.get('model_version', '')}")
