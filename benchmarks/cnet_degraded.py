"""Does C-Net earn its place where photo quality varies? C-Net vs the plain mean on degraded sets.

C-Net's purpose is to down-weight bad photos when a person's identity is aggregated. This puts
bad photos in every set: each Yale image (already with side-lit ones: leftlight, rightlight) gets
one degraded copy, in turn blurred, darkened, partly occluded (a band over the eyes) or small
(a quarter of the size, upscaled back). The copies go through the default extraction like any
photo (a copy the detector misses is a no_face row and drops out), then, per seed and fold of the
report's split by image: C-Net trained weakly on the training images, C(n, 3) combinations of
each person's images aggregated by C-Net and by the mean, nearest class mean after within-class
whitening (benchmarks/cnet_identity_proxy.py, the same code), on the identity coefficients.

    .venv/bin/python benchmarks/cnet_degraded.py --seeds 5

Writes benchmarks/results/cnet_degraded.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnet_identity_proxy import run_fold  # noqa: E402

from facedist.images import decode_image  # noqa: E402
from facedist.training.data import load_data  # noqa: E402

DEGRADATIONS = ("blur", "dark", "occluded", "small")


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), 0.02 * max(h, w))
    if kind == "dark":
        noisy = image.astype(np.float32) * 0.2 + rng.normal(0, 4, image.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)
    if kind == "occluded":
        out = image.copy()
        out[int(0.3 * h):int(0.5 * h), int(0.15 * w):int(0.85 * w)] = 0
        return out
    small = cv2.resize(image, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def build_set(images: Path, out: Path, seed: int = 0) -> Path:
    """PNG copies (original + one degraded copy each) and a manifest with the labels."""
    from facedist.datasets import records_from_paths

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = records_from_paths(sorted(str(p) for p in images.iterdir() if p.is_file()), dataset="yale")
    rows = []
    for i, record in enumerate(records):
        image = decode_image(Path(record.path).read_bytes())
        kind = DEGRADATIONS[i % len(DEGRADATIONS)]
        for name, picture in (("clean", image), (kind, degrade(image, kind, rng))):
            path = out / f"{Path(record.path).name}.{name}.png"
            cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            rows.append({"path": str(path), "subject": record.subject, "expression": record.expression,
                         "quality": name})
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/yalefaces"))
    parser.add_argument("--work", default="/tmp/facedist_cnet_degraded")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "cnet_degraded.json"))
    args = parser.parse_args()
    from facedist.extraction.config import ExtractConfig
    from facedist.extraction.local import run_extraction
    from facedist.extraction.rows import discover_records

    started = time.perf_counter()
    work = Path(args.work)
    manifest = build_set(Path(args.images), work / "images")
    table = str(work / "coefficients")
    summary = run_extraction(discover_records(str(manifest)), table, ExtractConfig(), progress=None)
    data = load_data(table)
    print(f"{summary['rows']} rows ({summary['counts']}), {len(data)} usable", flush=True)
    results = {"images": args.images, "rows": summary["rows"], "counts": summary["counts"],
               "usable": len(data), "backend": data.layout.backend, "folds": args.folds, "seeds": []}
    for seed in range(args.seeds):
        rows = [run_fold(data, fold, args.folds, seed, args.epochs) for fold in range(args.folds)]
        row = {"seed": seed, "acc_cnet": float(np.mean([r["acc_cnet"] for r in rows])),
               "acc_mean": float(np.mean([r["acc_mean"] for r in rows])), "folds": rows}
        print(json.dumps({k: v for k, v in row.items() if k != "folds"}), flush=True)
        results["seeds"].append(row)
    for name in ("cnet", "mean"):
        accs = [s[f"acc_{name}"] for s in results["seeds"]]
        results[f"acc_{name}"] = {"mean": float(np.mean(accs)), "std": float(np.std(accs))}
    diffs = [f["acc_cnet"] - f["acc_mean"] for s in results["seeds"] for f in s["folds"]]
    results["cnet_minus_mean"] = {"mean": float(np.mean(diffs)), "folds_won": int(np.sum(np.array(diffs) > 0)),
                                  "folds_lost": int(np.sum(np.array(diffs) < 0)),
                                  "folds_tied": int(np.sum(np.array(diffs) == 0))}
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["threads"] = os.cpu_count()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "seeds"}, indent=2))


if __name__ == "__main__":
    main()
