"""The output folder of an extraction (or prediction) run: Parquet parts, the keys already
written (resume), parts set aside by --no-resume, and the summary."""

from __future__ import annotations

import json
import uuid
from typing import Callable

from facedist import SettingsError, storage
from facedist.extraction.config import ExtractConfig
from facedist.extractors.base import Extractor
from facedist.schema import METADATA_LAYOUT_KEY, STATUS_OK, STATUSES, CoefficientLayout


SUMMARY_NAME = "_summary.json"

PART_PREFIX = "part-"


class OutputSettingsError(SettingsError):
    """The output already holds rows extracted with other settings (backend, detector, model)."""


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
    detector, landmark source, model version): a resumed run must never mix them."""
    expected = layout.to_json()
    others = {raw: parts for raw, parts in output_layouts(out_uri, options).items() if not _same_layout(raw, layout)}
    if not others:
        return
    raw, parts = next(iter(others.items()))
    try:  # read as this version names the fields (an older table's landmarks: landmark_source)
        theirs = json.loads(CoefficientLayout.from_json(raw).to_json()) if raw else {}
    except (TypeError, ValueError):
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
