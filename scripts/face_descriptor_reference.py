"""Writes tests/data/face_descriptor/: reference outputs of dlib's own float face descriptor for
tests/test_face_descriptor.py and tests/test_face_chip.py, computed once and committed.

For each London photo named: FaceBoxes' face, dlib's 68 landmarks (landmarks.json), dlib's chip
(dlib.get_face_chip, size 150, padding 0.25) as <photo>_chip.png, and dlib's 128-d descriptor
(compute_face_descriptor on the photo with those landmarks) in reference.json.

    FACEDIST_MODEL_DIR=../shared/models .venv/bin/python scripts/face_descriptor_reference.py \
        --data ../shared/data/london --photos 001_03.jpg 002_03.jpg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import dlib
import numpy as np

from facedist.detection import FaceBoxesDetector
from facedist.images import decode_image
from facedist.landmarks import DlibShapePredictor, dlib_model_path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "face_descriptor"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--photos", nargs="+", default=["001_03.jpg", "002_03.jpg"])
    args = parser.parse_args(argv)
    detector, predictor = FaceBoxesDetector(), DlibShapePredictor()
    recogniser = dlib.face_recognition_model_v1(str(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")))
    OUT.mkdir(parents=True, exist_ok=True)
    reference = {"model": "dlib_face_recognition_resnet_model_v1.dat (face_recognition_models)",
                 "dlib": dlib.__version__, "chip": {"size": 150, "padding": 0.25}, "faces": {}}
    for name in args.photos:
        image = decode_image((Path(args.data) / name).read_bytes())
        box = detector.detect_batch([image])[0][0].box
        points = predictor.predict_one(image, box)
        shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), [dlib.point(int(x), int(y)) for x, y in points])
        chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
        cv2.imwrite(str(OUT / f"{Path(name).stem}_chip.png"), cv2.cvtColor(chip, cv2.COLOR_RGB2BGR))
        descriptor = np.array(recogniser.compute_face_descriptor(image, shape))
        reference["faces"][name] = {"landmarks": points.astype(int).tolist(),
                                    "descriptor": [round(float(v), 7) for v in descriptor]}
    faces = reference.pop("faces")
    head = json.dumps(reference)[:-1]  # one face a line: readable diffs, no line per number
    body = ",\n".join(f"  {json.dumps(name)}: {json.dumps(face)}" for name, face in faces.items())
    (OUT / "reference.json").write_text(f'{head}, "faces": {{\n{body}\n}}}}\n')


if __name__ == "__main__":
    main()
