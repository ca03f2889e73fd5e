"""Extraction throughput: the plain single-process loop vs Ray Data with 1 and 2 actors, for each
face detector (FaceBoxes, dlib's HOG) in the same run.

The same N jittered Yale images (small random shifts and brightness changes, JPEG) go through
facedist.extraction.local.run_extraction and facedist.extraction.distributed.run_ray_extraction with the same
backend and batch size. Ray's cluster start-up is timed separately; each Ray run's time includes
its own actor start-up and model loading, as the plain loop's includes its model loading.

The plain loop runs on one thread (detect_threads=1, one torch thread per process default). For
comparison, not as a target, the dlib loop is also timed with a detection thread per core: dlib
releases the GIL, so one process gets most of what a second actor gets.

    FACEDIST_MODEL_DIR=../shared/models .venv/bin/python benchmarks/extract_ray.py --n 2000 --repeats 2

Writes JSON (default benchmarks/results/extract_ray.json) and prints it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FACEDIST_MODEL_DIR", str(REPO.parent / "shared" / "models"))

from facedist.datasets import records_from_paths  # noqa: E402
from facedist.extraction.config import ExtractConfig  # noqa: E402
from facedist.extraction.local import run_extraction  # noqa: E402


def make_images(yale_dir: Path, n: int, folder: Path, seed: int = 0) -> list[str]:
    """n JPEGs cycled from the Yale faces, each shifted by up to 8 px and brightened by +-15 %."""
    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(yale_dir.glob("subject*"))]
    paths = []
    for i in range(n):
        image = sources[i % len(sources)].astype(np.float32)
        dy, dx = rng.integers(-8, 9, size=2)
        image = np.roll(image, (int(dy), int(dx)), axis=(0, 1)) * rng.uniform(0.85, 1.15)
        buf = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(str(path))
    return paths


def _bare_worker(args: tuple[list[str], str, str]) -> int:
    """One process, no Ray: read, decode and extract its share of the images (nothing written)."""
    paths, backend, detector = args
    import torch

    from facedist.extractors import make_extractor
    from facedist.extraction.local import batched
    from facedist.extraction.rows import decode_row, extract_rows, read_row

    torch.set_num_threads(1)
    extractor = make_extractor(backend, detector=detector, detect_threads=1)
    for batch in batched(paths, 16):
        extract_rows([decode_row(read_row({"path": p})) for p in batch], extractor)
    return len(paths)


def bare_process_scaling(paths: list[str], backend: str, detector: str) -> dict:
    """The machine's own ceiling: the same work in 1 vs 2 plain processes (no Ray), models
    loaded before the clock starts. If this is far below 2x, the cores are busy with others."""
    import multiprocessing as mp

    out = {}
    for workers in (1, 2):
        shares = [paths[i::workers] for i in range(workers)]
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_bare_worker, [(paths[:2], backend, detector)] * workers)  # warm: imports, model files
            seconds, _ = timed(lambda: pool.map(_bare_worker, [(share, backend, detector) for share in shares]))
        out[f"{workers}_process_seconds"] = round(seconds, 2)
    out["scaling_2_vs_1_processes"] = round(out["1_process_seconds"] / out["2_process_seconds"], 3)
    out["n_images"] = len(paths)
    return out


def timed(fn) -> tuple[float, dict]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run_variants(runs: dict[str, list[dict]], records, work: Path, args, detector: str,
                 actor_counts: list[int], repeat: int) -> None:
    """One repeat of every variant for one detector: the plain loop, (dlib) the threaded loop,
    Ray with each actor count. Appends to runs[variant]."""
    from facedist.extraction.distributed import RayExtractConfig, run_ray_extraction

    config = ExtractConfig(backend=args.backend, detector=detector, batch_size=args.batch_size,
                           resume=False, detect_threads=1)
    out = work / f"{detector}-plain{repeat}"
    seconds, summary = timed(lambda: run_extraction(records, str(out), config))
    runs.setdefault("plain_loop", []).append({
        "seconds": round(seconds, 2), "images_per_s": round(len(records) / seconds, 3),
        "counts": summary["counts"], "load_average": os.getloadavg()[0]})
    print(f"{detector} plain loop: {runs['plain_loop'][-1]}", file=sys.stderr)
    if args.threaded and detector == "dlib":
        threaded = replace(config, detect_threads=os.cpu_count() or 1)
        out = work / f"{detector}-threaded{repeat}"
        seconds, summary = timed(lambda: run_extraction(records, str(out), threaded))
        runs.setdefault("plain_loop_threaded", []).append({
            "seconds": round(seconds, 2), "images_per_s": round(len(records) / seconds, 3),
            "counts": summary["counts"], "detect_threads": threaded.detect_threads})
        print(f"{detector} plain loop, threaded detection: {runs['plain_loop_threaded'][-1]}", file=sys.stderr)
    for actors in actor_counts:
        out = work / f"{detector}-ray{actors}-{repeat}"
        # Actors detect on as many threads as their CPU share (1 here): detect_threads=0.
        ray_config = RayExtractConfig(extract=replace(config, detect_threads=0), actors=actors, progress=False)
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        seconds, summary = timed(lambda: run_ray_extraction(records, str(out), ray_config))
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        driver_cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        run = summary["run"]
        steady = seconds - run["first_result_seconds"]
        runs.setdefault(f"ray_{actors}_actors", []).append({
            "seconds": round(seconds, 2), "images_per_s": round(len(records) / seconds, 3),
            "counts": summary["counts"], "resources": run["resources"],
            "actor_busy_seconds": run["actor_busy_seconds"], "actor_utilisation": run["actor_utilisation"],
            # An actor's extraction time per image: rises when actors compete for cores.
            "actor_ms_per_image": round(1000 * run["actor_busy_seconds"] / len(records), 2),
            # Start-up (actors, models, first batch) vs the rate once results flow.
            "first_result_seconds": run["first_result_seconds"],
            "steady_images_per_s": round(len(records) / steady, 3) if steady > 0 else None,
            # The driver's own CPU (Ray Data's scheduling loop, listing, summary), per image.
            "driver_cpu_ms_per_image": round(1000 * driver_cpu / len(records), 2),
            "load_average": os.getloadavg()[0]})
        print(f"{detector} ray, {actors} actor(s): {runs[f'ray_{actors}_actors'][-1]}", file=sys.stderr)


def summarize_detector(runs: dict[str, list[dict]], n: int, actor_counts: list[int]) -> dict:
    """Medians over repeats, speed-ups against the plain loop, 2 vs 1 actors."""
    def median_seconds(name: str) -> float:
        return float(np.median([r["seconds"] for r in runs[name]]))

    plain_s = median_seconds("plain_loop")
    out: dict = {"plain_loop": {"median_seconds": round(plain_s, 2), "images_per_s": round(n / plain_s, 3),
                                "runs": runs["plain_loop"]}}
    for actors in actor_counts:
        name = f"ray_{actors}_actors"
        ray_s = median_seconds(name)
        out[name] = {"median_seconds": round(ray_s, 2), "images_per_s": round(n / ray_s, 3),
                     "speedup_vs_plain": round(plain_s / ray_s, 3),
                     "steady_images_per_s": float(np.median([r["steady_images_per_s"] or 0 for r in runs[name]])),
                     # What Ray adds per image over the plain loop's work (negative: it gains).
                     "overhead_ms_per_image_vs_plain": round(1000 * (ray_s - plain_s) / n, 2),
                     "runs": runs[name]}
    if runs.get("plain_loop_threaded"):
        threaded_s = median_seconds("plain_loop_threaded")
        # Not a target: what one process gets from a detection thread per core, for comparison.
        out["plain_loop_threaded"] = {"median_seconds": round(threaded_s, 2), "images_per_s": round(n / threaded_s, 3),
                                      "speedup_vs_plain": round(plain_s / threaded_s, 3),
                                      "runs": runs["plain_loop_threaded"]}
    if {1, 2} <= set(actor_counts):
        out["scaling_2_vs_1_actors"] = round(median_seconds("ray_1_actors") / median_seconds("ray_2_actors"), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images (at least 1000 for the reported figures)")
    parser.add_argument("--backend", default="tddfa")
    parser.add_argument("--detectors", default="faceboxes,dlib", help="detectors to compare, comma-separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--actors", default="1,2", help="actor counts to run, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every variant (median)")
    parser.add_argument("--ceiling", type=int, default=400, metavar="N",
                        help="also time N images in 1 vs 2 plain processes, without Ray (0: skip)")
    parser.add_argument("--threaded", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the dlib loop with a detection thread per core")
    parser.add_argument("--yale", default=str(REPO.parent / "shared" / "data" / "yalefaces"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "extract_ray.json"))
    args = parser.parse_args(argv)

    import ray
    import torch

    work = Path(tempfile.mkdtemp(prefix="facedist-bench-"))
    try:
        images = work / "images"
        images.mkdir()
        gen_seconds, paths = timed(lambda: make_images(Path(args.yale), args.n, images))
        records = records_from_paths(paths, dataset="none")
        detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
        results: dict = {
            "benchmark": "extract_ray", "n_images": len(records), "backend": args.backend,
            "detectors": detectors, "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch_threads_plain": torch.get_num_threads(),
            "ray_version": ray.__version__, "generate_seconds": round(gen_seconds, 2),
            "load_average_start": os.getloadavg(),
        }
        init_seconds, _ = timed(lambda: ray.init(num_cpus=args.cpus, include_dashboard=False,
                                                 log_to_driver=False))
        results["ray_init_seconds"] = round(init_seconds, 2)
        actor_counts = [int(a) for a in args.actors.split(",")]
        runs: dict[str, dict[str, list[dict]]] = {d: {} for d in detectors}
        # Interleaved repeats: load from other processes on a shared machine hits every variant alike.
        for repeat in range(args.repeats):
            for detector in detectors:
                run_variants(runs[detector], records, work, args, detector, actor_counts, repeat)
        ray.shutdown()
        for detector in detectors:
            results[detector] = summarize_detector(runs[detector], len(records), actor_counts)
        if len(detectors) > 1:
            base, other = detectors[0], detectors[1]
            # The same run, same images: how much faster the first detector's path is.
            results[f"{base}_vs_{other}"] = {
                variant: round(results[base][variant]["images_per_s"] / results[other][variant]["images_per_s"], 3)
                for variant in results[base] if isinstance(results[base][variant], dict)
                and "images_per_s" in results[base][variant] and variant in results[other]}
        if args.ceiling:
            for detector in detectors:
                results[detector]["bare_process_ceiling"] = bare_process_scaling(
                    paths[: args.ceiling], args.backend, detector)
                print(f"bare processes, {detector}: {results[detector]['bare_process_ceiling']}", file=sys.stderr)
        results["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
