"""Bulk enrolment on Ray Data (`facedist gallery enroll --models M --gallery URI MANIFEST`): the thin
adapter around facedist.gallery's functions.

    images?  a CSV/Parquet manifest of images (path, subject) is extracted first by the extraction
             job (facedist.extraction.distributed, resumable) into a coefficients table beside the gallery
    people:  the table's parts (only the columns the embedding reads) -> groupby(subject) ->
             one row per person: their photos' embeddings (an actor pool: the model loads once)
    parts:   batches of whole people -> one gallery part each (Gallery.enroll_many): a batch lands
             whole or not at all, so a job killed midway leaves whole enrolments only
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from facedist import SettingsError, runtime, storage
from facedist.extraction.config import ExtractConfig
from facedist.schema import INPUT_GROUPS

PERSON_SCHEMA = pa.schema([pa.field("person", pa.string()), pa.field("photos", pa.list_(pa.string())),
                           pa.field("embeddings", pa.list_(pa.list_(pa.float32()))),
                           pa.field("left_out", pa.int64())])
RESULT_SCHEMA = pa.schema([pa.field("people", pa.int64()), pa.field("photos", pa.int64()),
                           pa.field("left_out", pa.int64()), pa.field("part", pa.string())])


@dataclass
class BulkEnrolConfig:
    coefficients: str | None = None       # where a manifest's images are extracted (default: GALLERY-coefficients)
    people_per_part: int = 1000           # whole enrolments per gallery part
    actors: int = 2
    subject_column: str = "subject"
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    dataset: str = "auto"


class EmbedPeople:
    """One group (one person's rows) -> one row: their photos' embeddings."""

    def __init__(self, model, subject_column: str):
        self.model, self.subject_column = model, subject_column

    def __call__(self, group: pa.Table) -> pa.Table:
        from facedist.prediction.rows import rows_from_arrow

        rows = rows_from_arrow(group)
        person = rows[0].get(self.subject_column) if rows else None
        if person is None:
            return PERSON_SCHEMA.empty_table()
        embeddings, have, _ = self.model.embed_rows(rows)
        return pa.Table.from_pylist([{"person": str(person), "photos": [rows[i].get("path") for i in have],
                                      "embeddings": embeddings.tolist(), "left_out": len(rows) - len(have)}],
                                    schema=PERSON_SCHEMA)


class WriteParts:
    """A batch of whole people -> one gallery part."""

    def __init__(self, gallery, model):
        self.gallery, self.model = gallery, model

    def __call__(self, batch: pa.Table) -> pa.Table:
        from facedist.gallery.store import Enrolment

        people = [Enrolment(r["person"], np.asarray(r["embeddings"], np.float32).reshape(len(r["embeddings"]), -1),
                            r["photos"]) for r in batch.to_pylist() if r["embeddings"]]
        written = self.gallery.enroll_many(people, self.model.version, self.model.kind)
        left_out = int(sum(batch.column("left_out").to_pylist()))
        return pa.Table.from_pylist([{"people": written["people"], "photos": written["photos"],
                                      "left_out": left_out, "part": written["part"]}], schema=RESULT_SCHEMA)


def run_bulk_enrolment(source: str, gallery, model, config: BulkEnrolConfig, address: str | None = None) -> dict:
    """Enrol every person of a manifest or coefficients table (a subject column) into ``gallery``."""
    from facedist.prediction.rows import table_layout, table_parts
    from facedist.extraction.distributed import RayExtractConfig, run_ray_extraction
    from facedist.prediction.distributed import _read

    started = time.perf_counter()
    options = gallery.options
    source = storage.absolute(source)
    gallery.check_embedding(model.version, model.dim, model.kind, create=True)
    parts = table_parts(source, options)
    if parts is None:
        coefficients = storage.absolute(config.coefficients or gallery.uri + "-coefficients")
        run_ray_extraction(source, coefficients, RayExtractConfig(extract=config.extract, actors=config.actors,
                                                                  dataset=config.dataset), address=address,
                           options=options)
        parts = table_parts(coefficients, options) or []
    if not parts:
        raise SettingsError(f"{source}: no coefficients table and no images to extract")
    available, _ = table_layout(parts, options)
    if config.subject_column not in available:
        raise SettingsError(f"{source}: no {config.subject_column!r} column to name the people by")
    columns = [c for c in ("path", "status", "message", config.subject_column,
                           *(INPUT_GROUPS[g] for g in model.inputs)) if c in available]
    ray = runtime.connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = runtime.verbose()
    people = _read(ray, parts, columns, options).groupby(
        config.subject_column, num_partitions=max(1, config.actors)).map_groups(
        EmbedPeople, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=max(1, config.actors)),
        num_cpus=0.25, fn_constructor_kwargs={"model": model, "subject_column": config.subject_column})
    written = people.map_batches(WriteParts, batch_format="pyarrow", batch_size=max(1, config.people_per_part),
                                 compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25,
                                 fn_constructor_kwargs={"gallery": gallery, "model": model})
    totals = {"people": 0, "photos": 0, "left_out": 0, "parts": 0}
    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            totals["people"] += row["people"]
            totals["photos"] += row["photos"]
            totals["left_out"] += row["left_out"]
            totals["parts"] += int(row["part"] is not None)
    return {**totals, "gallery": gallery.uri, "seconds": round(time.perf_counter() - started, 2)}
