"""Does dlib's 68-point predictor need FaceBoxes boxes mapped to the HOG boxes it was trained on?

On photos where both detectors find exactly one face, fits HOG box = FaceBoxes box moved by
(dx, dy) x side and scaled by k (side = mean of width and height; least squares), then compares
dlib's predictor on the HOG box with it on the raw and on the mapped FaceBoxes box: mean point
distance over the inter-ocular distance. facedist passes FaceBoxes boxes as they are because the
map buys nothing here.

    FACEDIST_MODEL_DIR=../shared/models .venv/bin/python benchmarks/box_calibration.py \
        --data ../shared/data/yalefaces ../shared/data/london --out benchmarks/results/box_calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FACEDIST_MODEL_DIR", str(REPO.parent / "shared" / "models"))

from facedist.detection import DlibHogDetector, FaceBoxesDetector  # noqa: E402
from facedist.extractors.base import interocular_distance  # noqa: E402
from facedist.images import ImageDecodeError, decode_image  # noqa: E402
from facedist.landmarks import DlibShapePredictor  # noqa: E402


def map_box(box, mapping: tuple[float, float, float]) -> np.ndarray:
    """Move the centre by (dx, dy) x side and scale width and height by k."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    dx, dy, k = mapping
    side = (x1 - x0 + y1 - y0) / 2
    cx, cy = (x0 + x1) / 2 + dx * side, (y0 + y1) / 2 + dy * side
    return np.array([cx - k * (x1 - x0) / 2, cy - k * (y1 - y0) / 2, cx + k * (x1 - x0) / 2, cy + k * (y1 - y0) / 2])


def box_params(box) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0 + y1 - y0) / 2])


def fit_map(fb_boxes, hog_boxes) -> tuple[float, float, float]:
    """Least squares of (dx, dy, k): hog centre - fb centre = (dx, dy) * side_fb, hog side = k side_fb."""
    fb = np.stack([box_params(b) for b in fb_boxes])
    hog = np.stack([box_params(b) for b in hog_boxes])
    side = fb[:, 2]
    dx = float(np.sum((hog[:, 0] - fb[:, 0]) * side) / np.sum(side ** 2))
    dy = float(np.sum((hog[:, 1] - fb[:, 1]) * side) / np.sum(side ** 2))
    k = float(np.sum(hog[:, 2] * side) / np.sum(side ** 2))
    return round(dx, 4), round(dy, 4), round(k, 4)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=[str(REPO.parent / "shared" / "data" / "yalefaces")])
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "box_calibration.json"))
    args = parser.parse_args(argv)

    images = []
    for folder in args.data:
        for path in sorted(Path(folder).iterdir()):
            try:
                images.append(decode_image(path.read_bytes(), max_side=args.max_side))
            except ImageDecodeError:
                continue  # labels.csv and the like
    fb, hog = FaceBoxesDetector(), DlibHogDetector(threads=os.cpu_count() or 1)
    fb_found, hog_found = fb.detect_batch(images), hog.detect_batch(images)
    pairs = [(im, f[0].box, h[0].box) for im, f, h in zip(images, fb_found, hog_found) if len(f) == 1 and len(h) == 1]
    mapping = fit_map([p[1] for p in pairs], [p[2] for p in pairs])

    predictor = DlibShapePredictor()
    ims, fb_boxes, hog_boxes = [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
    ref = predictor.predict_batch(ims, hog_boxes)

    def distance(points) -> dict:
        d = np.array([np.linalg.norm(p - r, axis=1).mean() / interocular_distance(r) for p, r in zip(points, ref)])
        return {"mean": round(float(d.mean()), 4), "median": round(float(np.median(d)), 4),
                "p95": round(float(np.percentile(d, 95)), 4)}

    report = {"benchmark": "box_calibration", "data": args.data, "images": len(images),
              "faceboxes_found": sum(bool(f) for f in fb_found), "dlib_found": sum(bool(h) for h in hog_found),
              "pairs": len(pairs), "map_dx_dy_k": mapping,
              "predictor_vs_on_hog_box_over_iod": {
                  "faceboxes_raw": distance(predictor.predict_batch(ims, fb_boxes)),
                  "faceboxes_mapped": distance(predictor.predict_batch(ims, [map_box(b, mapping) for b in fb_boxes]))}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
