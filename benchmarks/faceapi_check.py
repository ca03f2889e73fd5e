"""Port check of face-api's expression and age/gender nets on facedist's FaceBoxes boxes.

London (all 204 photos; "smiling" is face-api's happy), per crop mode (pad: face-api's own crop;
box: the box squared about its centre):
  * zero-shot neutral / happy: argmax over {neutral, happy} only and over all 7 classes, the
    smiling photos called neutral and the neutral ones called happy, and the AUC of the
    happy - neutral logit (happy the positive class);
  * a linear probe on the 256-d expression feature, the report's protocol (logistic, 5 folds split
    by person, 5 seeds), for comparison with facedist's coefficients;
  * gender accuracy against labels.csv, age MAE against labels.csv and that of predicting every
    photo the set's mean age (the photos with an age in labels.csv).
Yale, zero-shot on the conditions face-api has a class for: happy, sad, surprised, normal (as
neutral); argmax over all 7 and over those 4.
Speed: ms per image on one core of each net alone (batch 1 and 16) and of the crop; median of
repeats, wall clock (perf_counter) and CPU (process_time), with the load average beside them.

    FACEDIST_MODEL_DIR=../shared/models .venv/bin/python benchmarks/faceapi_check.py
        [--london DIR] [--yale DIR] [--out benchmarks/results/faceapi_check.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from facedist.datasets import parse_yale_name
from facedist.detection import make_face_detector
from facedist.face_attributes import SQUARE_MODES, FaceAttributeNets, faceapi_inputs
from facedist.images import decode_image
from facedist.schema import FACEAPI_EXPRESSIONS
from facedist.reports.person import logistic_probe, person_folds, unit_total_variance

SHARED = Path(os.environ.get("FACEDIST_SHARED", Path(__file__).resolve().parents[2] / "shared"))
YALE_TO_FACEAPI = {"happy": "happy", "sad": "sad", "surprised": "surprised", "normal": "neutral"}
NEUTRAL, HAPPY = FACEAPI_EXPRESSIONS.index("neutral"), FACEAPI_EXPRESSIONS.index("happy")


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def detect(detector, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The largest FaceBoxes box per image; (boxes, found mask)."""
    boxes, found = np.zeros((len(images), 4), np.float32), np.zeros(len(images), bool)
    for i in range(0, len(images), 16):
        for j, faces in enumerate(detector.detect_batch(images[i:i + 16])):
            if faces:
                boxes[i + j], found[i + j] = faces[0].box, True
    return boxes, found


def london_metrics(out: dict, rows: list[dict], probe_seeds: int) -> dict:
    truth = np.array([r["expression"] for r in rows])
    happy = truth == "happy"
    logits = out["expression_logits"]
    two = np.where(logits[:, HAPPY] > logits[:, NEUTRAL], "happy", "neutral")
    seven = np.array([FACEAPI_EXPRESSIONS[k] for k in logits.argmax(1)])
    codes, subjects = happy.astype(np.int64), np.array([r["subject"] for r in rows])
    feature, hits = out["expression_feature"], []
    for seed in range(probe_seeds):
        folds = person_folds(subjects, 5, seed)
        for fold in range(5):
            tr, te = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
            w = unit_total_variance(feature, tr)
            hits.append(logistic_probe(w[tr], codes[tr], w[te], 2) == codes[te])
    male = np.array([r["gender"] == "male" for r in rows])
    age = np.array([float(r["age"]) if r["age"] not in ("", "NA") else np.nan for r in rows])
    aged = ~np.isnan(age)  # labels.csv has no age for two people
    pred_age, age = out["faceapi_age"][aged], age[aged]
    return {
        "zero_shot_accuracy_neutral_vs_happy": round(float((two == truth).mean()), 4),
        "zero_shot_accuracy_argmax_of_7": round(float((seven == truth).mean()), 4),
        "smiling_called_neutral_of_2": int(((two == "neutral") & happy).sum()),
        "neutral_called_happy_of_2": int(((two == "happy") & ~happy).sum()),
        "argmax_of_7_by_truth": {t: {e: int(((seven == e) & (truth == t)).sum()) for e in FACEAPI_EXPRESSIONS
                                     if ((seven == e) & (truth == t)).any()} for t in ("neutral", "happy")},
        "auc_happy_minus_neutral_logit": round(auc(logits[:, HAPPY] - logits[:, NEUTRAL], happy), 4),
        "probe_256d_accuracy": round(float(np.concatenate(hits).mean()), 4),
        "gender_accuracy": round(float(((out["faceapi_gender_male"] > 0.5) == male).mean()), 4),
        "age_photos": int(aged.sum()),
        "age_mae": round(float(np.abs(pred_age - age).mean()), 2),
        "age_mean_error": round(float((pred_age - age).mean()), 2),
        "age_mae_of_mean_age_baseline": round(float(np.abs(age.mean() - age).mean()), 2),
        "age_correlation": round(float(np.corrcoef(pred_age, age)[0, 1]), 3),
    }


def yale_metrics(out: dict, truth: list[str]) -> dict:
    truth = np.array(truth)
    logits = out["expression_logits"]
    seven = np.array([FACEAPI_EXPRESSIONS[k] for k in logits.argmax(1)])
    kept = [FACEAPI_EXPRESSIONS.index(e) for e in ("neutral", "happy", "sad", "surprised")]
    four = np.array([FACEAPI_EXPRESSIONS[kept[k]] for k in logits[:, kept].argmax(1)])
    return {
        "zero_shot_accuracy_argmax_of_7": round(float((seven == truth).mean()), 4),
        "zero_shot_accuracy_argmax_of_4": round(float((four == truth).mean()), 4),
        "per_class_accuracy_of_4": {e: round(float((four[truth == e] == e).mean()), 4)
                                    for e in ("neutral", "happy", "sad", "surprised")},
        "argmax_of_7_by_truth": {t: {e: int(((seven == e) & (truth == t)).sum()) for e in FACEAPI_EXPRESSIONS
                                     if ((seven == e) & (truth == t)).any()}
                                 for t in ("neutral", "happy", "sad", "surprised")},
    }


def timings(nets: FaceAttributeNets, images: list[np.ndarray], boxes: np.ndarray, repeats: int = 20) -> dict:
    """ms per image; torch on one thread (the caller sets it)."""

    def measure(fn, n: int) -> dict:
        fn()  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall.append((time.perf_counter() - w) / n * 1000)
            cpu.append((time.process_time() - c) / n * 1000)
        return {"wall_ms": round(float(np.median(wall)), 2), "cpu_ms": round(float(np.median(cpu)), 2)}

    out = {}
    with torch.inference_mode():
        for batch in (1, 16):
            x = torch.from_numpy(faceapi_inputs(images[:batch], boxes[:batch])).contiguous(
                memory_format=torch.channels_last)  # as FaceAttributeNets runs them
            out[f"expression_net_batch_{batch}"] = measure(lambda: nets.expression_net(x), batch)
            out[f"age_gender_net_batch_{batch}"] = measure(lambda: nets.age_gender_net(x), batch)
    out["crop_per_image"] = measure(lambda: faceapi_inputs(images[:16], boxes[:16]), 16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--london", type=Path, default=SHARED / "data/london")
    parser.add_argument("--yale", type=Path, default=SHARED / "data/yalefaces")
    parser.add_argument("--probe-seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/faceapi_check.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    detector = make_face_detector("faceboxes")

    rows = list(csv.DictReader((args.london / "labels.csv").open()))
    london = [decode_image((args.london / r["path"]).read_bytes()) for r in rows]
    london_boxes, london_found = detect(detector, london)
    yale_paths = [p for p in sorted(args.yale.iterdir())
                  if (parse_yale_name(p.name) or {}).get("condition") in YALE_TO_FACEAPI]
    yale = [decode_image(p.read_bytes()) for p in yale_paths]
    yale_boxes, yale_found = detect(detector, yale)
    yale_truth = [YALE_TO_FACEAPI[parse_yale_name(p.name)["condition"]] for p in yale_paths]

    result = {
        "what": "face-api 1.7.15 expression + age/gender nets (torch port) on FaceBoxes boxes; zero-shot",
        "london": {"images": len(rows), "faces_found": int(london_found.sum())},
        "yale": {"images": len(yale_paths), "faces_found": int(yale_found.sum()),
                 "conditions": YALE_TO_FACEAPI},
    }
    if not london_found.all() or not yale_found.all():
        print("no face found in:", [r["path"] for r, f in zip(rows, london_found) if not f],
              [p.name for p, f in zip(yale_paths, yale_found) if not f])
    for square in SQUARE_MODES:
        nets = FaceAttributeNets(square=square)
        keep = np.flatnonzero(london_found)
        out = nets.predict([london[i] for i in keep], london_boxes[keep])
        result["london"][square] = london_metrics(out, [rows[i] for i in keep], args.probe_seeds)
        keep = np.flatnonzero(yale_found)
        out = nets.predict([yale[i] for i in keep], yale_boxes[keep])
        result["yale"][square] = yale_metrics(out, [yale_truth[i] for i in keep])
        print(square, json.dumps({"london": result["london"][square], "yale": result["yale"][square]}))
    result["speed"] = {"threads": 1, "device": "cpu", "load_average_before": os.getloadavg(),
                       **timings(FaceAttributeNets(), london, london_boxes)}
    result["speed"]["load_average_after"] = os.getloadavg()
    print(json.dumps(result["speed"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
