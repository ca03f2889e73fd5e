"""68 iBUG landmarks of a face whose box is already known (the detector's, facedist.detection).

Two predictors:
  * DlibShapePredictor: dlib's 68-point shape predictor (an ensemble of regression trees, about
    1 ms a face) shipped in the face_recognition_models package. CPU, no downloads.
  * FaceAlignmentPredictor: the face-alignment package's 2-D FAN heatmap regressor. Its weights
    live in the torch hub cache ($TORCH_HOME/hub/checkpoints) and are downloaded on first use
    when there is network.

A third source, 3DDFA_V2's regressed landmarks, lives with its regressor (facedist.extractors.tddfa).
Every predictor takes a batch: images and one box per image in, one (68, 2) array per image out.
Models load once, in __init__.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Protocol, Sequence
from urllib.parse import urlparse

import numpy as np

from facedist.images import as_rgb_uint8
from facedist.schema import NUM_LANDMARKS


class LandmarkPredictor(Protocol):
    name: str
    version: str

    def predict_batch(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 images and a face box (x0, y0, x1, y1) for each; a (68, 2) float32 array of
        (x, y) pixels per image, iBUG order."""
        ...


class LandmarkModelMissingError(FileNotFoundError):
    """A landmark model's weights are not on disk and could not be fetched."""


# ---------------------------------------------------------------------------------------- dlib

def dlib_model_path(filename: str = "shape_predictor_68_face_landmarks.dat") -> Path:
    """A dlib model shipped by face_recognition_models, found without importing the package
    (its __init__ needs pkg_resources, which newer setuptools no longer provide)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise LandmarkModelMissingError(
            f"dlib's {filename} comes from the face_recognition_models package, which is "
            "not installed: pip install face-recognition-models")
    path = Path(spec.origin).parent / "models" / filename
    if not path.is_file():
        raise LandmarkModelMissingError(f"dlib model not found at {path}; reinstall face-recognition-models")
    return path


class DlibShapePredictor:
    """dlib's 68-point shape predictor on given boxes, about 2 ms a face on one core.

    It runs on the calling thread: dlib's Python binding holds the GIL while it predicts, so
    threads would not run it in parallel. It was trained on boxes from dlib's HOG detector, but
    FaceBoxes boxes serve as they are: mapped to the HOG convention first, its points move no
    closer to those it gives on the HOG box (benchmarks/box_calibration.py measures both)."""

    name = "dlib"

    def __init__(self, predictor_path: str | os.PathLike | None = None):
        import dlib

        self._dlib = dlib
        path = Path(predictor_path or dlib_model_path())
        self._predictor = dlib.shape_predictor(str(path))
        self.version = f"{path.stem}:dlib-{dlib.__version__}"

    def predict_one(self, image: np.ndarray, box) -> np.ndarray:
        rgb = as_rgb_uint8(image)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box[:4])
        detection = self._predictor(rgb, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        return np.array([[p.x, p.y] for p in detection.parts()], np.float32)

    def predict_batch(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.predict_one(image, box) for image, box in zip(images, boxes)]


# ------------------------------------------------------------------------------ face-alignment

def _hub_checkpoint_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def face_alignment_weight_files() -> dict[str, str]:
    """{file name in the torch hub checkpoints dir: URL} of face-alignment's 2-D FAN."""
    from face_alignment.api import models_urls as fan_urls

    url = fan_urls["2DFAN-4"]
    return {os.path.basename(urlparse(url).path): url}


def missing_face_alignment_files() -> dict[str, str]:
    folder = _hub_checkpoint_dir()
    return {name: url for name, url in face_alignment_weight_files().items() if not (folder / name).is_file()}


def _missing_message(missing: dict[str, str], reason: str) -> str:
    folder = _hub_checkpoint_dir()
    listing = "; ".join(f"{name} (from {url})" for name, url in missing.items())
    return (f"face-alignment weights are missing ({reason}): {listing}. Place these files in {folder} "
            f"(the torch hub cache: set TORCH_HOME to choose it), or run once with network access "
            f"so face-alignment downloads them.")


class FaceAlignmentPredictor:
    """face-alignment's 2-D FAN on given boxes (its own face detector is never run)."""

    name = "face-alignment"

    def __init__(self, device: str = "cpu", flip_input: bool = True, allow_download: bool = True):
        import face_alignment

        missing = missing_face_alignment_files()
        if missing and not allow_download:
            raise LandmarkModelMissingError(_missing_message(missing, "downloads disabled"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # face-alignment builds a face detector whatever we do; its "dlib" one loads no
                # weights on CPU, and boxes always come from facedist's detector.
                self._fa = face_alignment.FaceAlignment(
                    face_alignment.LandmarksType.TWO_D, device="cpu" if "cuda" not in device else device,
                    face_detector="dlib", face_detector_kwargs=self._detector_kwargs(device),
                    flip_input=flip_input, **self._compile_kwargs(face_alignment))
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            still_missing = missing_face_alignment_files()
            if still_missing:
                raise LandmarkModelMissingError(_missing_message(still_missing, f"download failed: {exc}")) from exc
            raise
        self.version = "2DFAN-4:" + ",".join(sorted(face_alignment_weight_files()))

    @staticmethod
    def _detector_kwargs(device: str) -> dict:
        # On CUDA face-alignment's dlib detector would download dlib's CNN detector; the same file
        # ships with face_recognition_models.
        return {"path_to_detector": str(dlib_model_path("mmod_human_face_detector.dat"))} if "cuda" in device else {}

    @staticmethod
    def _compile_kwargs(face_alignment) -> dict:
        # face-alignment >= 1.5 torch.compile()s FAN by default: minutes of compiling and a C
        # toolchain on CPU workers, for little gain at our batch sizes. Older versions lack it.
        import inspect

        params = inspect.signature(face_alignment.FaceAlignment.__init__).parameters
        return {"compile": False} if "compile" in params else {}

    def predict_one(self, image: np.ndarray, box) -> np.ndarray:
        rgb = as_rgb_uint8(image)
        # float64: face-alignment writes box-derived numpy float32 scalars into torch tensors and fails.
        boxes = [np.append(np.asarray(box, np.float64)[:4], 1.0)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            landmarks = self._fa.get_landmarks_from_image(rgb, detected_faces=boxes)
        return landmarks_from_face_alignment(landmarks)

    def predict_batch(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.predict_one(image, box) for image, box in zip(images, boxes)]


def landmarks_from_face_alignment(landmarks) -> np.ndarray:
    """face-alignment's answer for one given box -> (68, 2) float32; anything else is an error."""
    if landmarks is None or len(landmarks) != 1:
        raise ValueError(f"face-alignment returned {0 if landmarks is None else len(landmarks)} "
                         "landmark sets for one box")
    points = np.asarray(landmarks[0], np.float32)[:, :2]
    if points.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected {NUM_LANDMARKS} landmarks, got {points.shape}")
    return points


# --------------------------------------------------------------------------------------- factory

LANDMARK_PREDICTORS = ("dlib", "face-alignment")


def make_landmark_predictor(name: "str | LandmarkPredictor" = "dlib", device: str = "cpu",
                            **options) -> LandmarkPredictor:
    """A predictor by name (options go to its constructor); a ready predictor passes through."""
    if not isinstance(name, str):
        return name
    if name == "dlib":
        return DlibShapePredictor(**options)
    if name in ("face-alignment", "face_alignment", "fan"):
        return FaceAlignmentPredictor(device=device, **options)
    raise ValueError(f"unknown landmark predictor {name!r}; choose one of {', '.join(LANDMARK_PREDICTORS)}")
