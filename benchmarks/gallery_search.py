"""Gallery search speed: queries/s of exact cosine top-k against 10k, 100k and 1M synthetic people.

Per size, synthetic people (one random unit 128-d embedding each: dlib's descriptor width) are
enrolled through the store (Gallery.enroll_many, --people-per-part whole enrolments per Parquet
part) into a local folder, loaded as a server replica loads it (GalleryReader: list, read the parts,
one aggregate per person), then searched: single queries (one identify request at a time) and
batches of 256 queries (`facedist predict --gallery` over a table), top-5. Also the load time, the
search matrix's size and the process's peak RSS. A size whose matrix would not fit in --max-gb is
skipped and said.

    .venv/bin/python benchmarks/gallery_search.py --sizes 10000 100000 1000000

Writes JSON (default benchmarks/results/gallery_search.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from facedist.gallery.embedding import unit  # noqa: E402
from facedist.gallery.store import Enrolment, Gallery, GalleryReader  # noqa: E402

DIM = 128


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def timed_queries(index, queries: np.ndarray, batch: int, k: int, min_seconds: float) -> dict:
    """Search ``queries`` in batches of ``batch`` until min_seconds passed (at least one pass)."""
    done, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while True:
        for start in range(0, len(queries), batch):
            index.search(queries[start:start + batch], k)
            done += len(queries[start:start + batch])
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            # CPU seconds of this process (all its threads): on a shared machine the wall clock
            # also counts the time other work held the cores.
            cpu = time.process_time() - cpu_started
            return {"queries": done, "seconds": round(elapsed, 3), "queries_per_s": round(done / elapsed, 1),
                    "ms_per_call": round(1000 * elapsed / (done / batch), 3), "cpu_seconds": round(cpu, 3),
                    "queries_per_cpu_s": round(done / cpu, 1)}


def run_size(n: int, args, work: Path) -> dict:
    rng = np.random.default_rng(n)
    uri = str(work / f"gallery-{n}")
    gallery = Gallery(uri)
    started = time.perf_counter()
    for start in range(0, n, args.people_per_part):
        count = min(args.people_per_part, n - start)
        x = unit(rng.standard_normal((count, DIM), dtype=np.float32))
        gallery.enroll_many([Enrolment(f"p{start + i:07d}", x[i:i + 1]) for i in range(count)], "bench", "descriptor")
    enrol_s = time.perf_counter() - started
    reader = GalleryReader(gallery, "bench")
    started = time.perf_counter()
    reader.refresh()
    load_s = time.perf_counter() - started
    index = reader.loaded.index
    started = time.perf_counter()
    unchanged = reader.refresh()
    recheck_s = time.perf_counter() - started
    assert not unchanged and len(index) == n
    queries = unit(rng.standard_normal((args.queries, DIM), dtype=np.float32))
    # The search is exact: a query that is an enrolled person's embedding finds them first.
    picked = rng.integers(0, n, 16)
    assert (index.search(index.matrix[picked], 1)[1][:, 0] == picked).all()
    load_before = os.getloadavg()[0]
    single = timed_queries(index, queries[:args.single_queries], 1, args.k, args.min_seconds)
    batched = timed_queries(index, queries, 256, args.k, args.min_seconds)
    out = {"people": n, "dim": DIM, "parts": reader.loaded.parts, "enrol_seconds": round(enrol_s, 2),
           "load_seconds": round(load_s, 2), "unchanged_listing_check_seconds": round(recheck_s, 4),
           "matrix_mb": round(index.matrix.nbytes / 1e6, 1),
           "single": single, "batched_256": batched, "peak_rss_gb": round(peak_rss_gb(), 2),
           # The machine is shared: its 1-minute load average before and after the searches.
           "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
    shutil.rmtree(uri, ignore_errors=True)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--people-per-part", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=1024, help="queries of the batched runs")
    parser.add_argument("--single-queries", type=int, default=200, help="queries of the single-query runs")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="each measurement runs at least this long")
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip a size whose matrix is larger")
    parser.add_argument("--work", default=None, help="where the galleries are written (default: a temp folder)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gallery_search.json"))
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gallery-bench-"))
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "numpy": np.__version__, "note": "2 cores shared with other work"},
               "k": args.k, "sizes": []}
    for n in args.sizes:
        if n * DIM * 4 / 1e9 > args.max_gb:
            results["sizes"].append({"people": n, "skipped": f"matrix of {n * DIM * 4 / 1e9:.1f} GB > --max-gb"})
            continue
        results["sizes"].append(run_size(n, args, work))
    text = json.dumps(results, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
