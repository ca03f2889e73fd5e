"""Extraction as row functions: read -> decode -> extract -> coefficient rows.

The single-process CLI and the Ray Data job run exactly these functions; they differ only in who
calls them. A row is a plain dict; every input row yields exactly one output row whose columns are
facedist.schema.COLUMNS, with status/message saying what happened to it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from facedist import SettingsError, storage
from facedist.datasets import ImageRecord
from facedist.extractors import DEFAULT_BACKEND, DEFAULT_TEXTURE_BASIS
from facedist.extractors.base import ExtractionResult, Extractor
from facedist.images import ImageDecodeError, content_hash, decode_image
from facedist.schema import (COLUMNS, LABEL_COLUMNS, METADATA_LAYOUT_KEY, STATUS_ERROR, STATUS_OK, STATUSES,
                             CoefficientLayout, rows_to_table)

SUMMARY_NAME = "_summary.json"
PART_PREFIX = "part-"


@dataclass
class ExtractConfig:
    backend: str = DEFAULT_BACKEND
    detector: str = "faceboxes"       # facedist.detection.DETECTORS
    landmarks: str | None = None      # None: the backend's own (facedist.extractors.DEFAULT_LANDMARKS)
    device: str = "cpu"
    # Images per extractor call and per Parquet part. Under Ray each batch is one actor call; 64
    # rather than 16 cut Ray's per-image overhead (benchmarks/extract_ray.py); the tddfa network
    # still runs its own chunks of 16 crops.
    batch_size: int = 64
    max_side: int = 2048         # longer images are downscaled on decode
    preview: int = 0             # write this many landmark/mesh overlays
    # True: skip images already in the output (made with the same settings; other settings are
    # an error). False: replace whatever the output holds.
    resume: bool = True
    # Threads for dlib's HOG detection within a batch (it releases the GIL); 0: one
    # per core in a single process, one per CPU of its share in a Ray actor.
    detect_threads: int = 0
    # Sample each face's colour on the fitted mesh (the table's texture column), and project it
    # on a texture basis for tex_coeffs: DEFAULT_TEXTURE_BASIS (the shipped one, texture backends
    # only), a URI (`facedist texture fit`), or None (no tex_coeffs).
    texture: bool = True
    texture_basis: str | None = DEFAULT_TEXTURE_BASIS
    # Fill face_embedding: dlib's 128-d face descriptor of each ok face (facedist.face_descriptor).
    face_embedding: bool = True
    # Fill expression_feature, expression_probs, faceapi_age and faceapi_gender_male: face-api's nets on each ok
    # face's detector box (facedist.face_attributes).
    face_attributes: bool = True

    def build_extractor(self, device: str | None = None, detect_threads: int | None = None) -> Extractor:
        """The extractor these settings describe; its models load here."""
        from facedist.extractors import make_extractor

        return make_extractor(self.backend, detector=self.detector, landmarks=self.landmarks,
                              device=device or self.device, texture=self.texture, texture_basis=self.texture_basis,
                              face_embedding=self.face_embedding, face_attributes=self.face_attributes,
                              detect_threads=detect_threads or self.detect_threads or os.cpu_count() or 1)


class OutputSettingsError(SettingsError):
    """The output already holds rows extracted with other settings (backend, detector, model)."""


def discover_records(source, dataset: str = "auto", options: storage.S3Options | None = None) -> list:
    """ImageRecords from a folder / s3:// prefix, a CSV/Parquet manifest with labels, or a list
    of records or paths."""
    from facedist.datasets import records_from_manifest, records_from_paths

    if not isinstance(source, (str, os.PathLike)):
        items = list(source)
        if all(isinstance(item, ImageRecord) for item in items):
            return items
        return records_from_paths([str(item) for item in items], dataset=dataset)
    source = str(source)
    if source.endswith((".csv", ".parquet")) and storage.exists(source, options):
        return records_from_manifest(source)
    paths = storage.list_files(source, options)
    return records_from_paths(paths, dataset=dataset, root=source)


def record_row(record: ImageRecord) -> dict:
    return {"path": record.path, **{k: getattr(record, k) for k in LABEL_COLUMNS}}


def read_row(row: dict, options: storage.S3Options | None = None) -> dict:
    """Attach the raw bytes (or an error) to a row. Raises only StoreUnavailableError."""
    out = dict(row)
    try:
        data = storage.read_bytes(row["path"], options)
        out["bytes"] = data
        out["content_hash"] = content_hash(data)
    except storage.StoreUnavailableError:
        # The store, not this image, is the problem: an error row would be taken as done on resume.
        raise
    except Exception as exc:  # a vanished object or a permission error is this row's problem only
        out.update(bytes=None, status=STATUS_ERROR, message=f"could not read {row['path']}: {exc}")
    return out


def decode_row(row: dict, max_side: int = 2048) -> dict:
    """Replace the bytes by a decoded RGB image, or mark the row as an error. Never raises."""
    out = dict(row)
    data = out.pop("bytes", None)
    out["image"] = None
    if out.get("status") == STATUS_ERROR or data is None:
        return out
    try:
        image = decode_image(data, max_side=max_side)
    except ImageDecodeError as exc:
        out.update(status=STATUS_ERROR, message=str(exc))
        return out
    except Exception as exc:  # a decoder bug must still not take the batch down
        out.update(status=STATUS_ERROR, message=f"decode failed: {type(exc).__name__}: {exc}")
        return out
    out["image"] = image
    return out


def extract_rows(rows: Sequence[dict], extractor: Extractor) -> tuple[list[dict], list[ExtractionResult | None]]:
    """Run the extractor on the decoded rows of a batch; rows in = rows out, in order.

    Returns the finished rows (schema columns only) and, aligned with them, the results (None for
    rows that never reached the extractor) for previews."""
    todo = [i for i, r in enumerate(rows) if r.get("image") is not None and r.get("status") != STATUS_ERROR]
    results: list[ExtractionResult | None] = [None] * len(rows)
    if todo:
        try:
            got = extractor.extract([rows[i]["image"] for i in todo])
            if len(got) != len(todo):
                raise RuntimeError(f"extractor returned {len(got)} results for {len(todo)} images")
        except Exception:
            # One failing batch call: retry image by image so one bad image cannot fail the others.
            got = [_extract_one(extractor, rows[i]["image"]) for i in todo]
        for i, result in zip(todo, got):
            results[i] = result
    finished = []
    for row, result in zip(rows, results):
        out = {name: row.get(name) for name in COLUMNS}
        if result is not None:
            out.update(result.to_row())
        if out.get("status") not in STATUSES:
            out["status"] = STATUS_ERROR
            out["message"] = out.get("message") or "not processed"
        out["message"] = out.get("message") or ""
        out["backend"] = getattr(extractor, "name", None)
        image = row.get("image")
        if image is not None and out.get("width") is None:
            out["height"], out["width"] = int(image.shape[0]), int(image.shape[1])
        finished.append(out)
    return finished, results


def _extract_one(extractor: Extractor, image: np.ndarray) -> ExtractionResult:
    try:
        return extractor.extract([image])[0]
    except Exception as exc:
        return ExtractionResult.error(f"extractor failed: {type(exc).__name__}: {exc}")


# ---- output folder: parts, resume keys, summary ---------------------------------------------

def list_parts(out_uri: str, options: storage.S3Options | None = None) -> list[str]:
    if not storage.exists(out_uri, options):
        return []
    return [f for f in storage.list_files(out_uri, options, recursive=False)
            if f.rsplit("/", 1)[-1].startswith(PART_PREFIX) and f.endswith(".parquet")]


def finished_keys(out_uri: str, options: storage.S3Options | None = None) -> set[tuple[str, str]]:
    """(path, content_hash) of every row already written: a resumed run skips these."""
    import pyarrow.parquet as pq

    keys: set[tuple[str, str]] = set()
    for part in list_parts(out_uri, options):
        fs, path = storage.filesystem_for(part, options)
        table = pq.read_table(path, filesystem=fs, columns=["path", "content_hash"])
        keys.update(zip(table.column("path").to_pylist(), table.column("content_hash").to_pylist()))
    return keys


def output_layouts(out_uri: str, options: storage.S3Options | None = None) -> dict[str, list[str]]:
    """{layout JSON: parts written with it} over the output's parts."""
    import pyarrow.parquet as pq

    layouts: dict[str, list[str]] = {}
    for part in list_parts(out_uri, options):
        fs, path = storage.filesystem_for(part, options)
        raw = (pq.read_schema(path, filesystem=fs).metadata or {}).get(METADATA_LAYOUT_KEY, b"")
        layouts.setdefault(raw.decode(), []).append(part)
    return layouts


def check_output_settings(out_uri: str, layout: CoefficientLayout, options: storage.S3Options | None = None) -> None:
    """Raise OutputSettingsError when out_uri holds parts made with another layout (backend,
    detector, landmarks, model version): a resumed run must never mix them."""
    expected = layout.to_json()
    others = {raw: parts for raw, parts in output_layouts(out_uri, options).items() if not _same_layout(raw, layout)}
    if not others:
        return
    raw, parts = next(iter(others.items()))
    theirs = json.loads(raw) if raw else {}
    mine = json.loads(expected)
    differ = [f"{k}: {theirs.get(k, '?')!r} there, {mine[k]!r} now" for k in mine if theirs.get(k) != mine[k]]
    raise OutputSettingsError(
        f"{out_uri} already holds {sum(len(p) for p in others.values())} part(s) extracted with other settings "
        f"({'; '.join(differ) or 'no layout recorded'}). Write to another output, or rerun with --no-resume "
        f"to replace them.")


def _same_layout(raw: str, layout: CoefficientLayout) -> bool:
    """A part's recorded layout is this one; fields it was written without count as their defaults
    (a table from before face_embedding existed matches a run that does not fill it)."""
    try:
        return bool(raw) and CoefficientLayout.from_json(raw) == layout
    except (TypeError, ValueError):  # a field this version does not know: another layout
        return False


REPLACED_DIR = "_replaced"


def set_aside(out_uri: str, options: storage.S3Options | None = None) -> str | None:
    """--no-resume: move the parts already in out_uri to OUT/_replaced/<tag>/ (out of the table,
    not yet deleted) and return that folder; None when there were none. remove_set_aside deletes
    _replaced/ once the new run has written all its rows; a run that fails leaves the old rows
    there, and the next --no-resume run that succeeds replaces them too."""
    parts = list_parts(out_uri, options)
    if not parts:
        return None
    folder = storage.join(out_uri, REPLACED_DIR, uuid.uuid4().hex[:8])
    for part in parts:
        storage.move(part, storage.join(folder, part.rsplit("/", 1)[-1]), options)
    return folder


def remove_set_aside(out_uri: str, options: storage.S3Options | None = None) -> None:
    """After a --no-resume run wrote all its rows: every set-aside part goes."""
    storage.delete(storage.join(out_uri, REPLACED_DIR), options)


def prepare_output(out_uri: str, config: ExtractConfig, options: storage.S3Options | None = None,
                   extractor: Extractor | None = None,
                   build: Callable[[], Extractor] | None = None
                   ) -> tuple[set[tuple[str, str]], Extractor | None, str | None]:
    """Before a run: (keys already done, the extractor if one was built, the set-aside folder).

    With resume, the output's settings are checked and its finished keys returned; only an output
    with parts needs the extractor (for its layout): `extractor`, else build(), else the one
    config describes. Without resume, the parts already there are set aside (set_aside), so the
    new rows never mix with the old ones, and the old are deleted only after the run succeeds."""
    if not config.resume:
        return set(), extractor, set_aside(out_uri, options)
    if not list_parts(out_uri, options):
        return set(), extractor, None
    extractor = extractor or (build() if build is not None else config.build_extractor())
    check_output_settings(out_uri, extractor.layout, options)
    return finished_keys(out_uri, options), extractor, None


def new_part_name(batch_index: int, run_id: str) -> str:
    return f"{PART_PREFIX}{run_id}-{batch_index:05d}.parquet"


def summarize(out_uri: str, options: storage.S3Options | None = None, **extra) -> dict:
    """Counts over every part in the output (all runs), plus what the caller adds; written as JSON."""
    import pyarrow.parquet as pq

    counts = {s: 0 for s in STATUSES}
    layout = None
    for part in list_parts(out_uri, options):
        fs, path = storage.filesystem_for(part, options)
        table = pq.read_table(path, filesystem=fs, columns=["status"])
        layout = layout or pq.read_schema(path, filesystem=fs).metadata.get(b"facedist.layout")
        for status in table.column("status").to_pylist():
            counts[status] = counts.get(status, 0) + 1
    summary = {"rows": sum(counts.values()), "counts": counts,
               "layout": json.loads(layout) if layout else None, **extra}
    storage.write_bytes(storage.join(out_uri, SUMMARY_NAME), json.dumps(summary, indent=2).encode(), options)
    return summary


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_extraction(
    records: Sequence[ImageRecord],
    out_uri: str,
    config: ExtractConfig,
    extractor: Extractor | None = None,
    options: storage.S3Options | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Single-process extraction of `records` into Parquet parts under `out_uri`; returns the summary."""
    started = time.perf_counter()
    storage_before = storage.stats_snapshot()
    done, extractor, _ = prepare_output(out_uri, config, options, extractor)
    run_id = uuid.uuid4().hex[:8]
    written = skipped = previews = 0
    for index, batch in enumerate(batched(records, config.batch_size)):
        rows = [read_row(record_row(r), options) for r in batch]
        pending = [r for r in rows if (r["path"], r.get("content_hash")) not in done]
        skipped += len(rows) - len(pending)
        if pending:
            # Built on first need, unless the settings check already built it.
            extractor = extractor or config.build_extractor()
            decoded = [decode_row(r, config.max_side) for r in pending]
            finished, results = extract_rows(decoded, extractor)
            storage.write_table(rows_to_table(finished, extractor.layout),
                                storage.join(out_uri, new_part_name(index, run_id)), options)
            written += len(finished)
            previews += write_previews(decoded, results, out_uri, config.preview - previews, options)
        if progress:
            progress(written + skipped, len(records))
    if not config.resume:
        remove_set_aside(out_uri, options)
    seconds = time.perf_counter() - started
    return summarize(out_uri, options, run={"inputs": len(records), "written": written, "skipped": skipped,
                                           "seconds": round(seconds, 3),
                                           "images_per_s": round(written / seconds, 3) if seconds else None,
                                           "config": asdict(config), "mode": "single-process",
                                           "storage": storage.stats_report(storage.stats_since(storage_before))})


def write_previews(rows, results, out_uri, budget, options) -> int:
    """Up to `budget` landmark/mesh overlays of ok rows as OUT/previews/<name>.png; returns how many."""
    if budget <= 0:
        return 0
    from facedist.preview import render_preview_png

    count = 0
    for row, result in zip(rows, results):
        if count >= budget:
            break
        if result is None or result.status != STATUS_OK:
            continue
        name = row["path"].replace("\\", "/").rsplit("/", 1)[-1]
        storage.write_bytes(storage.join(out_uri, "previews", f"{name}.png"),
                            render_preview_png(row["image"], result), options)
        count += 1
    return count
