"""Extraction as row functions: read -> decode -> extract -> coefficient rows.

The single-process runner (extraction.local), the Ray Data job (extraction.distributed) and the
server run exactly these functions; they differ only in who calls them. A row is a plain dict;
every input row yields exactly one output row whose columns are facedist.schema.COLUMNS, with
status/message saying what happened to it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from facedist import storage
from facedist.datasets import ImageRecord
from facedist.extractors.base import ExtractionResult, Extractor
from facedist.images import ImageDecodeError, content_hash, decode_image
from facedist.schema import COLUMNS, LABEL_COLUMNS, STATUS_ERROR, STATUSES


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
