"""Batch prediction as plain functions: coefficient rows -> prediction rows (`facedist predict`).

The decision logic is the Recognizer's (facedist.recognition), the one copy /v1/predict also
runs: a row's prediction is Recognizer.predict([row]) (identity and gender of that image alone,
its expression), and a group's identity is Recognizer.predict(the group's rows), as /v1/predict
answers for one person's photos. Here only the table's shape is handled:

  * PredictConfig        the settings (one declaration; the CLI's flags take their defaults)
  * rows_from_arrow      Arrow rows -> dicts whose list columns are numpy views (no Python float
                         per value: a 512-wide feature column stays one buffer)
  * predict_rows         rows -> PREDICTIONS_SCHEMA rows, one per input row, in order
  * group_identity       a group's rows -> its identity (label, score)
  * table_parts          whether an input is a coefficients table (its Parquet parts) or images
  * prediction_settings / check_output_settings: what an output was made with; a resumed run
    refuses to add rows of other models

The Ray Data job around them is facedist.prediction.distributed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from facedist import SettingsError, storage
from facedist.extraction.config import ExtractConfig
from facedist.extraction.output import list_parts
from facedist.features import QUALITY_COLUMNS
from facedist.recognition import DEFAULT_TOP_K, Recognizer, bundle_version
from facedist.schema import (INPUT_GROUPS, METADATA_LAYOUT_KEY, METADATA_PREDICTIONS_KEY, STATUS_OK,
                             current_names, image_outcome)


@dataclass
class PredictConfig:
    models: str                          # the training output: cnet/, identity/, gender/, expression/, age/ bundles
    top_k: int = DEFAULT_TOP_K           # identity labels ranked per row
    group_by: str | None = None          # a column of the table: its rows with one value are one person
    batch_size: int = 1024               # rows per actor call and per Parquet part
    actors: int = 2                      # prediction actors (each loads the models once)
    resume: bool = True                  # skip rows already in the output (path + content_hash)
    progress: bool = True
    # Image inputs: extraction first (facedist.extraction.distributed, these settings), into this table
    # (default OUT/_coefficients), then prediction over it.
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    coefficients: str | None = None
    dataset: str = "auto"                # how labels are read from image file names
    gallery: str | None = None           # a gallery (facedist.gallery): each row's gallery_identity / gallery_score


# Scalar columns besides the descriptor groups that prediction reads.
ROW_COLUMNS = ("path", "content_hash", "status", "message")


def needed_columns(recognizer: Recognizer, available: list[str], group_by: str | None = None) -> list[str]:
    """The table columns the recognizer reads (its models' descriptor groups, C-Net's quality
    inputs), those present in ``available``."""
    wanted = list(ROW_COLUMNS) + ["id_coeffs"]
    for inputs in recognizer.inputs.values():
        wanted += [INPUT_GROUPS[name] for name in inputs]
    if "cnet" in recognizer.bundles:
        wanted += list(QUALITY_COLUMNS)
    if group_by:
        wanted.append(group_by)
    return [c for c in dict.fromkeys(wanted) if c in available]


def rows_from_arrow(table: pa.Table) -> list[dict]:
    """One dict per row; a list column's values are numpy views into one flat buffer (None where
    null), other columns Python values."""
    if not table.num_rows:
        return []
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            offsets = np.asarray(column.offsets.to_numpy(zero_copy_only=False), np.int64)
            offsets = offsets - offsets[0]
            flat = column.flatten()
            values = (np.asarray(pc.fill_null(flat, 0).to_numpy(zero_copy_only=False))
                      if pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)
                      else np.asarray(flat.to_pylist(), object))
            valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False))
            columns[name] = [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(column))]
        else:
            columns[name] = column.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def predict_rows(recognizer: Recognizer, rows: list[dict], top_k: int = DEFAULT_TOP_K,
                 groups: dict | None = None, group_by: str | None = None, gallery=None) -> list[dict]:
    """One PREDICTIONS_SCHEMA row per input row, in order: each row on its own through
    Recognizer.predict_many (= Recognizer.predict([row]) per row). ``groups``: {value of the
    group_by column: (group_identity, group_identity_score)} from group_identity. ``gallery``:
    (EmbeddingModel, GalleryIndex) to match each row's photo against (facedist.gallery)."""
    answers = recognizer.predict_many([[row] for row in rows], top_k)
    matches = [(None, None)] * len(rows)
    if gallery is not None:
        from facedist.gallery.search import match_rows

        matches = match_rows(*gallery, rows)
    out = []
    for row, answer, (gallery_identity, gallery_score) in zip(rows, answers, matches):
        image = answer["images"][0]
        status, message = image_outcome(row, image)
        entry = {"path": row.get("path"), "content_hash": row.get("content_hash"), "status": status,
                 "message": message}
        if status == STATUS_OK:
            ranked = (answer.get("identity") or {}).get("top_k") or []
            if ranked:
                entry.update(identity=ranked[0]["label"], identity_score=ranked[0]["score"], identity_top_k=ranked)
            gender = answer.get("gender")
            if gender:
                entry.update(gender=gender["label"], gender_score=gender["scores"][gender["label"]])
            if answer.get("age") is not None:
                entry.update(age=answer["age"], age_mae=answer["age_mae"])
            label = image.get("expression_label")
            if label is not None:
                entry.update(expression=label, expression_score=image["expression"][label])
        if gallery_identity is not None and entry["status"] == STATUS_OK:
            entry.update(gallery_identity=gallery_identity, gallery_score=gallery_score)
        if group_by:
            key = row.get(group_by)
            entry["group"] = None if key is None else str(key)
            if entry["group"] is not None and groups and entry["group"] in groups:
                entry["group_identity"], entry["group_identity_score"] = groups[entry["group"]]
        out.append(entry)
    return out


def group_identity(recognizer: Recognizer, rows: list[dict], top_k: int = DEFAULT_TOP_K
                   ) -> tuple[str | None, float | None]:
    """The identity of one group's rows together (Recognizer.predict over them): (label, score),
    (None, None) when none of them is usable."""
    ranked = ((recognizer.predict(rows, top_k).get("identity") or {}).get("top_k")) or []
    return (ranked[0]["label"], ranked[0]["score"]) if ranked else (None, None)


# ---- inputs and outputs ----------------------------------------------------------------------

def table_parts(uri: str, options: storage.S3Options | None = None) -> list[str] | None:
    """The Parquet parts of a coefficients table at ``uri`` (a folder / prefix of parts, or one
    Parquet file), or None when ``uri`` is not one (images, or a manifest). A table is known by
    its files: Parquet with the coefficient layout in the metadata, or an id_coeffs column."""
    import pyarrow.parquet as pq

    if uri.endswith(".parquet") and storage.exists(uri, options):
        fs, path = storage.filesystem_for(uri, options)
        if fs.get_file_info(path).type == pafs.FileType.File:
            candidates = [uri]
        else:
            candidates = list_parts(uri, options)
    else:
        try:
            candidates = list_parts(uri, options)
        except (FileNotFoundError, OSError):
            return None
    if not candidates:
        return None
    fs, path = storage.filesystem_for(candidates[0], options)
    schema = pq.read_schema(path, filesystem=fs)
    is_table = METADATA_LAYOUT_KEY in (schema.metadata or {}) or "id_coeffs" in schema.names
    return candidates if is_table else None


def table_layout(parts: list[str], options: storage.S3Options | None = None) -> tuple[list[str], dict | None]:
    """(the columns of the table's first part, its coefficient layout as a dict or None)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(parts[0], options)
    schema = pq.read_schema(path, filesystem=fs)
    raw = (schema.metadata or {}).get(METADATA_LAYOUT_KEY)
    return current_names(schema), (json.loads(raw) if raw else None)


def table_rows(parts: list[str], options: storage.S3Options | None = None) -> int:
    """Rows of a table, from its parts' footers."""
    import pyarrow.parquet as pq

    total = 0
    for part in parts:
        fs, path = storage.filesystem_for(part, options)
        with fs.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def prediction_settings(recognizer: Recognizer, models: str, top_k: int, group_by: str | None,
                        gallery: str | None = None) -> dict:
    """What a predictions table is made with: the models (each bundle's weights version), the
    top-k, the grouping and the gallery, if any. Stored in every part; a resumed run must match it."""
    versions = {task: bundle_version(b) for task, b in sorted(recognizer.bundles.items())}
    settings = {"models": models, "versions": versions, "top_k": top_k, "group_by": group_by}
    if gallery:
        settings["gallery"] = gallery
    return settings


class PredictionSettingsError(SettingsError):
    """The output already holds predictions made with other models or settings."""


def check_output_settings(out_uri: str, settings: dict, options: storage.S3Options | None = None) -> None:
    """Raise PredictionSettingsError when out_uri holds parts made with other models, top-k or
    grouping (the models' location may differ: the same weights are the same models)."""
    import pyarrow.parquet as pq

    mine = {k: v for k, v in settings.items() if k != "models"}
    for part in list_parts(out_uri, options):
        fs, path = storage.filesystem_for(part, options)
        raw = (pq.read_schema(path, filesystem=fs).metadata or {}).get(METADATA_PREDICTIONS_KEY)
        theirs = json.loads(raw) if raw else {}
        theirs = {k: v for k, v in theirs.items() if k != "models"}
        if theirs != mine:
            differ = [f"{k}: {theirs.get(k, '?')!r} there, {mine[k]!r} now" for k in mine if theirs.get(k) != mine[k]]
            raise PredictionSettingsError(
                f"{out_uri} already holds predictions made with other settings ({'; '.join(differ)}). Write to "
                f"another output, or rerun with --no-resume to replace them.")
