"""Does facedist's torch port of dlib's face descriptor give dlib's descriptors, as fast as claimed?

On London's photos (each adult neutral and happy): FaceBoxes finds the face, dlib's 68-point
predictor places the landmarks, and both descriptors run on the same points: dlib's own float
model (dlib.face_recognition_model_v1.compute_face_descriptor) and facedist's FaceDescriptor
(face-api's uint8 weights on torch, facedist.face_chip's chips). Reports

  * the chips: largest pixel difference from dlib.get_face_chip (same points, size 150, pad 0.25);
  * the cosine between the two descriptors of each face (mean, min);
  * identity rank-1, no training: gallery = each person's neutral photo, probes = the happy ones,
    nearest by cosine, for both descriptors;
  * speed on one thread: the network alone at batch 1 and 16, the chips, the whole embed, and
    dlib's compute_face_descriptor (chip + network), in ms per face, beside the load average.

The port passes when the mean cosine is >= 0.99 and its rank-1 is within 0.01 of dlib's.

    FACEDIST_MODEL_DIR=../shared/models .venv/bin/python benchmarks/face_descriptor_check.py \
        --data ../shared/data/london --out benchmarks/results/face_descriptor_check.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # dlib's and torch's CPU kernels on one thread each

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FACEDIST_MODEL_DIR", str(REPO.parent / "shared" / "models"))

import torch  # noqa: E402

from facedist.detection import FaceBoxesDetector  # noqa: E402
from facedist.face_chip import CHIP_PADDING, CHIP_SIZE, face_chips  # noqa: E402
from facedist.face_descriptor import FaceDescriptor  # noqa: E402
from facedist.images import decode_image  # noqa: E402
from facedist.landmarks import DlibShapePredictor, dlib_model_path  # noqa: E402


def dlib_shape(dlib, points: np.ndarray):
    """A full_object_detection of 68 integer points (dlib's predictor gives integers already)."""
    rect = dlib.rectangle(0, 0, 1, 1)  # unused by the chip: only the parts align it
    return dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in points])


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rank1(embeddings: np.ndarray, subjects: list[str], expressions: list[str]) -> tuple[float, int]:
    """Neutral photo per person = gallery, happy photos = probes; (rate, probes) by cosine."""
    gallery = [i for i, e in enumerate(expressions) if e == "neutral"]
    probes = [i for i, e in enumerate(expressions) if e != "neutral"
              and subjects[i] in {subjects[g] for g in gallery}]
    sims = unit(embeddings[probes]) @ unit(embeddings[gallery]).T
    best = np.asarray(gallery)[sims.argmax(1)]
    hits = [subjects[b] == subjects[p] for b, p in zip(best, probes)]
    return float(np.mean(hits)), len(probes)


def time_per_face(fn, n_faces: int, repeats: int) -> float:
    """Median ms per face of fn() over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) / n_faces * 1e3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "london"))
    parser.add_argument("--limit", type=int, default=0, help="first N photos only (0: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "face_descriptor_check.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import dlib

    root = Path(args.data)
    with open(root / "labels.csv") as fh:
        labels = sorted(csv.DictReader(fh), key=lambda row: row["path"])  # a person's photos side by side
    if args.limit:
        labels = labels[:args.limit]
    detector, predictor = FaceBoxesDetector(), DlibShapePredictor()
    images, points, kept, skipped = [], [], [], []
    for row in labels:
        image = decode_image((root / row["path"]).read_bytes())
        faces = detector.detect_batch([image])[0]
        if not faces:
            skipped.append(row["path"])
            continue
        images.append(image)
        points.append(predictor.predict_one(image, faces[0].box))
        kept.append(row)
    subjects = [row["subject"] for row in kept]
    expressions = [row["expression"] for row in kept]
    points_arr = np.stack(points)

    recogniser = dlib.face_recognition_model_v1(str(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")))
    shapes = [dlib_shape(dlib, p) for p in points]
    theirs = np.array([np.array(recogniser.compute_face_descriptor(img, s)) for img, s in zip(images, shapes)])
    their_chips = np.stack([dlib.get_face_chip(img, s, size=CHIP_SIZE, padding=CHIP_PADDING)
                            for img, s in zip(images, shapes)])

    descriptor = FaceDescriptor(device="cpu", batch_size=16)
    ours = descriptor.embed(images, points_arr)
    our_chips = face_chips(images, points_arr)
    chip_diff = np.abs(our_chips.astype(np.int16) - their_chips.astype(np.int16))
    cosines = np.sum(unit(theirs) * ours, axis=1)
    # The network alone on dlib's chips: what the port changes apart from the chip.
    on_their_chips = descriptor.embed_chips(their_chips)
    cos_their_chips = np.sum(unit(theirs) * on_their_chips, axis=1)

    rank_dlib, n_probes = rank1(theirs, subjects, expressions)
    rank_ours, _ = rank1(ours, subjects, expressions)

    # Speed, one thread.
    n16 = min(16, len(images))
    x1 = torch.from_numpy(our_chips[:1]).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
    x16 = torch.from_numpy(our_chips[:n16]).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net_b1 = time_per_face(lambda: descriptor.infer_model(x1), 1, 30)
        net_b16 = time_per_face(lambda: descriptor.infer_model(x16), n16, 8)
    chips_ms = time_per_face(lambda: face_chips(images[:n16], points_arr[:n16]), n16, 5)
    embed_b1 = time_per_face(lambda: descriptor.embed(images[:1], points_arr[:1]), 1, 20)
    embed_b16 = time_per_face(lambda: descriptor.embed(images[:n16], points_arr[:n16]), n16, 5)
    dlib_ms = time_per_face(lambda: [recogniser.compute_face_descriptor(images[i], shapes[i]) for i in range(8)], 8, 3)

    passed = bool(cosines.mean() >= 0.99 and abs(rank_ours - rank_dlib) <= 0.01)
    result = {
        "data": root.name,
        "photos": len(labels),
        "faces": len(kept),
        "no_face": skipped,
        "descriptor": descriptor.version,
        "chip_vs_dlib_get_face_chip": {"max_abs_diff": int(chip_diff.max()),
                                       "pixels_differing": float((chip_diff > 0).mean())},
        "cosine_with_dlib": {"mean": round(float(cosines.mean()), 5), "min": round(float(cosines.min()), 5),
                             "min_photo": kept[int(cosines.argmin())]["path"]},
        "cosine_with_dlib_on_dlib_chips": {"mean": round(float(cos_their_chips.mean()), 5),
                                           "min": round(float(cos_their_chips.min()), 5)},
        "identity_rank1_neutral_gallery_happy_probes": {"probes": n_probes, "dlib": round(rank_dlib, 4),
                                                        "facedist": round(rank_ours, 4)},
        "ms_per_face_one_thread": {
            "network_batch1": round(net_b1, 2), "network_batch16": round(net_b16, 2),
            "chips": round(chips_ms, 2), "embed_batch1": round(embed_b1, 2), "embed_batch16": round(embed_b16, 2),
            "dlib_compute_face_descriptor": round(dlib_ms, 2)},
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__, "dlib": dlib.__version__, "cpu": platform.processor() or platform.machine(),
        "criteria": "mean cosine >= 0.99 and |rank-1 - dlib's| <= 0.01",
        "passed": passed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
