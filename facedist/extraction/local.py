"""Single-process extraction (`facedist extract` without --ray): the row functions in a loop."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from typing import Callable, Iterable, Iterator, Sequence

from facedist import storage
from facedist.datasets import ImageRecord
from facedist.extraction.config import ExtractConfig
from facedist.extraction.output import new_part_name, prepare_output, remove_set_aside, summarize, write_previews
from facedist.extraction.rows import decode_row, extract_rows, read_row, record_row
from facedist.extractors.base import Extractor
from facedist.schema import rows_to_table


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
