"""`facedist predict` on Ray Data: the thin adapter around facedist.prediction.rows' row functions.

    images?  an input that is not a coefficients table is extracted first, by the extraction job
             itself (facedist.extraction.distributed, resumable) into OUT/_coefficients, then predicted
    groups:  with --group-by, one identity per group: groupby + map_groups over the table (an
             actor pool, models loaded once per actor); one small row per group to the driver
    rows:    read the table's parts (only the columns the models read) -> actor pool (models
             loaded once per actor), batches of rows -> one Parquet part per batch
    driver:  counts statuses as parts land (progress bar) -> extraction.output.summarize writes _summary.json

Rows in = rows out: every row of the table yields one prediction row (an error row keeps its
status and message). Rows already in the output (path + content_hash) are skipped, and parts are
named after their rows' keys, so a retried batch rewrites its own part. Why the group pass runs
before the rows rather than over the written output: a group's identity needs the group's
coefficients together, which the predictions do not hold; over the table it is one cheap pass
(no images, tiny models) whose answers every row of the group then carries, also rows written by
an earlier run of the same table and models (an output keeps one set of models: checked on resume).
"""

from __future__ import annotations

import gc
import sys
import time
import uuid
from dataclasses import asdict

import pyarrow as pa

from facedist import SettingsError, runtime, storage
from facedist.extraction.output import finished_keys, remove_set_aside, set_aside, summarize
from facedist.prediction.rows import PredictConfig, check_output_settings, group_identity, needed_columns, predict_rows, prediction_settings, rows_from_arrow, table_layout, table_parts, table_rows
from facedist.progress import progress_bar
from facedist.extraction.distributed import RayExtractConfig, SKIPPED, part_name, plan_resources, run_ray_extraction
from facedist.recognition import Recognizer, check_layouts
from facedist.schema import STATUS_ERROR, STATUSES, predictions_to_table

COEFFICIENTS_DIR = "_coefficients"  # where image inputs are extracted to, under OUT (not a part of it)
RESULT_SCHEMA = pa.schema([pa.field("status", pa.string()), pa.field("part", pa.string())])


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


class PredictActor:
    """Loads the models once; each call predicts one batch of table rows and writes one part."""

    def __init__(self, models: str, out_uri: str, options: storage.S3Options | None, run_id: str, settings: dict,
                 top_k: int, group_by: str | None, groups: dict, done: frozenset, torch_threads: int,
                 gallery: str | None = None):
        _torch_threads(torch_threads)
        self.recognizer = Recognizer.from_directory(models)
        self.gallery = _load_gallery(models, gallery, options) if gallery else None
        self.out_uri, self.options, self.run_id, self.settings = out_uri, options, run_id, settings
        self.top_k, self.group_by, self.groups, self.done = top_k, group_by, groups, done

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep = [key not in self.done for key in _row_keys(batch)]
        skipped = keep.count(False)
        rows = rows_from_arrow(batch.filter(pa.array(keep, pa.bool_())) if skipped else batch)
        out = predict_rows(self.recognizer, rows, self.top_k, self.groups, self.group_by, self.gallery)
        name = None
        if out:
            name = part_name(self.run_id, out)
            storage.write_table(predictions_to_table(out, self.settings), storage.join(self.out_uri, name),
                                self.options)
        return pa.Table.from_pydict({"status": [r["status"] for r in out] + [SKIPPED] * skipped,
                                     "part": [name] * len(out) + [None] * skipped}, schema=RESULT_SCHEMA)


def _load_gallery(models: str, gallery: str, options: storage.S3Options | None) -> tuple:
    """(EmbeddingModel of models/embedding, the gallery's search index), loaded once per actor."""
    from facedist.gallery.embedding import EmbeddingModel
    from facedist.gallery.store import Gallery, GalleryReader

    model = EmbeddingModel.load(models)
    reader = GalleryReader(Gallery(gallery, options), model.version)
    reader.refresh()
    return model, reader.loaded.index


class GroupActor:
    """Loads the models once; each call is one group's rows -> one row: its identity."""

    def __init__(self, models: str, top_k: int, group_by: str, torch_threads: int):
        _torch_threads(torch_threads)
        self.recognizer = Recognizer.from_directory(models)
        self.top_k, self.group_by = top_k, group_by

    def __call__(self, group: pa.Table) -> pa.Table:
        rows = rows_from_arrow(group)
        key = rows[0].get(self.group_by) if rows else None
        if key is None:  # rows without a value belong to no group
            keys, labels, scores = [], [], []
        else:
            label, score = group_identity(self.recognizer, rows, self.top_k)
            keys, labels, scores = [str(key)], [label], [score]
        return pa.Table.from_pydict({"group": keys, "group_identity": labels, "group_identity_score": scores},
                                    schema=pa.schema([pa.field("group", pa.string()),
                                                      pa.field("group_identity", pa.string()),
                                                      pa.field("group_identity_score", pa.float64())]))


# CPUs per Parquet read task, as extraction's decode tasks: what plan_resources leaves free of the
# actors' share is enough for them (read tasks asking 1 CPU each would wait forever beside the actors).
READ_NUM_CPUS = RayExtractConfig.decode_num_cpus
# CPUs per group actor: the models are tiny, and the shuffle before them needs the rest.
GROUP_NUM_CPUS = 0.25


def read_parts(batch: pa.Table, *, columns: list[str], options: storage.S3Options | None) -> pa.Table:
    """The rows of the table parts named in the batch (only ``columns``), through facedist.storage
    (its S3 retries), as a Ray task."""
    tables = [storage.read_table(part, options, columns=columns) for part in batch.column("part").to_pylist()]
    return pa.concat_tables(tables, promote_options="default")


def _read(ray, parts: list[str], columns: list[str], options: storage.S3Options | None):
    """The table's rows on Ray Data, one block per part: the part names go out from the driver,
    as extraction's records do (no listing task asking a whole CPU beside the actors)."""
    return ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts)).map_batches(
        read_parts, batch_format="pyarrow", batch_size=None, num_cpus=READ_NUM_CPUS,
        fn_kwargs={"columns": columns, "options": options})


def run_ray_prediction(inputs: str, out_uri: str, config: PredictConfig, address: str | None = None,
                       options: storage.S3Options | None = None) -> dict:
    """Predict every row of a coefficients table (or every image of a folder / prefix /
    manifest, extracted first) into Parquet parts under out_uri; returns the summary (also
    out_uri/_summary.json)."""
    options = options or storage.S3Options.from_env()
    out_uri = storage.absolute(out_uri)
    inputs = storage.absolute(str(inputs))
    models = storage.absolute(config.models)
    started = time.perf_counter()
    # The models load here first: a missing bundle or a backend mismatch stops before any work.
    recognizer = Recognizer.from_directory(models)
    gallery = storage.absolute(config.gallery)
    settings = prediction_settings(recognizer, models, config.top_k, config.group_by, gallery)
    embedding_columns: list[str] = []
    if gallery:  # the embedding bundle and the gallery's embedding are checked before any work
        from facedist.gallery.store import GalleryError
        from facedist.schema import INPUT_GROUPS

        try:
            embedding = _load_gallery(models, gallery, options)[0]
        except (FileNotFoundError, GalleryError) as exc:
            raise SettingsError(str(exc)) from None
        embedding_columns = [INPUT_GROUPS[g] for g in embedding.inputs]
    parts = table_parts(inputs, options)
    extraction = None
    if parts is None:
        coefficients = storage.absolute(config.coefficients or storage.join(out_uri, COEFFICIENTS_DIR))
        _check_backend(recognizer, config.extract.backend)
        extraction = run_ray_extraction(inputs, coefficients, RayExtractConfig(
            extract=config.extract, actors=config.actors, dataset=config.dataset, progress=config.progress),
            address=address, options=options)
        parts = table_parts(coefficients, options) or []
    if not parts:
        raise SettingsError(f"{inputs}: no coefficients table and no images to extract")
    available, layout = table_layout(parts, options)
    if layout:
        _check_backend(recognizer, layout["backend"])
    if config.group_by and config.group_by not in available:
        raise SettingsError(f"--group-by {config.group_by}: the table has no such column "
                            f"(it has {', '.join(available)})")
    columns = needed_columns(recognizer, available, config.group_by)
    columns += [c for c in embedding_columns if c in available and c not in columns]
    if config.resume:
        check_output_settings(out_uri, settings, options)
        done, replaced = frozenset(finished_keys(out_uri, options)), None
    else:
        done, replaced = frozenset(), set_aside(out_uri, options)
    total = table_rows(parts, options)
    # A rerun with every row already written has nothing to send out: no actor pool starts (their
    # start, models loaded in each, is most of a small rerun's time).
    left = not (done and len(done) >= total and _all_done(parts, available, done, options))

    ray = runtime.connect(address)
    plan = plan_resources(RayExtractConfig(actors=config.actors, actor_num_gpus=0), ray.cluster_resources())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.progress and runtime.verbose()
    ctx.verbose_stats_logs = False
    actors = ray.data.ActorPoolStrategy(size=max(1, config.actors))
    groups: dict = {}
    group_seconds = 0.0
    if config.group_by and left:
        group_started = time.perf_counter()
        # As many shuffle partitions as actors: Ray's default (200) would wait on aggregators a
        # small cluster has no CPUs for beside the actors.
        grouped = _read(ray, parts, columns, options).groupby(
            config.group_by, num_partitions=max(1, config.actors)).map_groups(
            GroupActor, batch_format="pyarrow", compute=actors, num_cpus=GROUP_NUM_CPUS,
            fn_constructor_kwargs={"models": models, "top_k": config.top_k, "group_by": config.group_by,
                                   "torch_threads": plan["torch_threads"]})
        for batch in grouped.iter_batches(batch_format="pyarrow", batch_size=None):
            groups.update(zip(batch.column("group").to_pylist(),
                              zip(batch.column("group_identity").to_pylist(),
                                  batch.column("group_identity_score").to_pylist())))
        # Its actors hold CPUs until the dataset is collected: free them for the row pass's.
        del grouped
        gc.collect()
        group_seconds = time.perf_counter() - group_started

    run_id = uuid.uuid4().hex[:8]
    bar = progress_bar("rows") if config.progress and not runtime.verbose() else None
    counts = {s: 0 for s in (*STATUSES, SKIPPED)}
    written_parts: set[str] = set()
    rows_started = time.perf_counter()
    counts[SKIPPED] = 0 if left else total
    ds = None if not left else _read(ray, parts, columns, options).map_batches(
        PredictActor, batch_format="pyarrow", batch_size=max(1, config.batch_size), compute=actors,
        num_cpus=plan["num_cpus"],
        fn_constructor_kwargs={"models": models, "out_uri": out_uri, "options": options, "run_id": run_id,
                               "settings": settings, "top_k": config.top_k, "group_by": config.group_by,
                               "groups": groups, "done": done, "torch_threads": plan["torch_threads"],
                               "gallery": gallery})
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) if ds is not None else ():
        for status in batch.column("status").to_pylist():
            counts[status if status in counts else STATUS_ERROR] += 1
        written_parts.update(p for p in batch.column("part").to_pylist() if p)
        if bar is not None:
            bar(sum(counts.values()), total)
    if bar is not None:
        bar.close()
    now = time.perf_counter()
    skipped = counts.pop(SKIPPED)
    written = sum(counts.values())
    lost = total - written - skipped
    if lost:  # must never happen; said loudly rather than hidden in a count
        print(f"facedist predict: WARNING {lost} input rows unaccounted for", file=sys.stderr)
    elif replaced:
        remove_set_aside(out_uri, options)
    run = {"inputs": total, "written": written, "skipped": skipped, "unaccounted": lost,
           "this_run_counts": counts, "parts_written": len(written_parts), "groups": len(groups) if config.group_by
           else None, "seconds": round(now - started, 3), "group_seconds": round(group_seconds, 3),
           "rows_seconds": round(now - rows_started, 3),
           "rows_per_s": round(written / (now - rows_started), 3) if written else None,
           "input": inputs, "extraction": extraction and extraction.get("run"),
           "config": asdict(config), "resources": plan, "run_id": run_id,
           "actors": config.actors}
    summary = summarize(out_uri, options, predictions=settings, run=run)
    print(one_line_summary(summary, out_uri), file=sys.stderr, flush=True)
    return summary


def _row_keys(table: pa.Table):
    """(path, content_hash) of each row, the key a resumed run skips by (content_hash None where
    the table has none)."""
    hashes = (table.column("content_hash").to_pylist() if "content_hash" in table.column_names
              else [None] * table.num_rows)
    return zip(table.column("path").to_pylist(), hashes)


def _all_done(parts: list[str], available: list[str], done: frozenset, options: storage.S3Options | None) -> bool:
    """Whether every row of the table (_row_keys, as PredictActor skips by) is in done."""
    columns = ["path"] + (["content_hash"] if "content_hash" in available else [])
    return all(all(key in done for key in _row_keys(storage.read_table(part, options, columns=columns)))
               for part in parts)


def _check_backend(recognizer: Recognizer, backend: str) -> None:
    try:
        check_layouts(recognizer.bundles, backend)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def one_line_summary(summary: dict, out_uri: str) -> str:
    counts, run = summary["counts"], summary.get("run", {})
    groups = f", {run['groups']} groups" if run.get("groups") is not None else ""
    return (f"facedist predict: {summary['rows']} rows in {out_uri} (ok {counts.get('ok', 0)}, "
            f"no_face {counts.get('no_face', 0)}, error {counts.get('error', 0)}{groups}); this run "
            f"{run.get('written')} written, {run.get('skipped')} skipped, {run.get('seconds')} s, "
            f"{run.get('rows_per_s')} rows/s")
