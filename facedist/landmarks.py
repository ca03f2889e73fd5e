"""Face detection + 68 iBUG landmarks behind one small interface.

Two backends:
  * DlibLandmarkDetector: dlib's HOG frontal detector and the 68-point shape predictor shipped in
    the face_recognition_models package. CPU-only, no downloads, fast enough for batch jobs.
  * FaceAlignmentLandmarkDetector: the face-alignment package (FAN heatmap regressor) with its
    S3FD / BlazeFace detector, or with dlib's boxes. Its weights live in the torch hub cache
    ($TORCH_HOME/hub/checkpoints) and are downloaded on first use when there is network.

Both return ALL faces, largest box first, as FaceDetection; [] when there is none. Models load
once, in __init__.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, TypeVar
from urllib.parse import urlparse

import numpy as np

from facedist.images import as_rgb_uint8
from facedist.schema import NUM_LANDMARKS


@dataclass
class FaceDetection:
    """One face: its box (x0, y0, x1, y1), the detector's score and 68 (x, y) landmarks."""

    box: np.ndarray        # (4,) float32
    score: float
    landmarks: np.ndarray  # (68, 2) float32, iBUG 68 order

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.box)
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


class LandmarkDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        """RGB uint8 (H, W, 3) in; all faces, largest box first; [] when none."""
        ...


class LandmarkModelMissingError(FileNotFoundError):
    """A landmark model's weights are not on disk and could not be fetched."""


def largest_first(detections: Sequence[FaceDetection]) -> list[FaceDetection]:
    """Sort by box area, descending; ties keep the higher score first."""
    return sorted(detections, key=lambda d: (-d.area, -d.score))


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


def dlib_shape_predictor_path() -> Path:
    return dlib_model_path("shape_predictor_68_face_landmarks.dat")


class DlibHogFaceDetector:
    """dlib's HOG + linear SVM frontal face detector, with scores.

    Small photos (longest side < upsample_below) are upsampled once: HOG's smallest window is
    80 px, about the size of the faces in Yale's 320x243 images. When a pass finds nothing, an
    image up to retry_below px gets one more pass at the other scale (on Yale this recovers
    faces in harsh side light that only one of the two scales finds).
    """

    def __init__(self, upsample_below: int = 400, threshold: float = 0.0, retry_below: int = 1024):
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self.upsample_below = upsample_below
        self.threshold = threshold
        self.retry_below = retry_below

    def boxes(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """[(box (4,) float32, score)] in detector order."""
        longest = max(rgb.shape[:2])
        passes = [1, 0] if longest < self.upsample_below else [0, 1]
        if longest >= self.retry_below:
            passes = passes[:1]
        for upsample in passes:
            rects, scores, _ = self._detector.run(rgb, upsample, self.threshold)
            if len(rects):
                return [
                    (np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float32), float(s))
                    for r, s in zip(rects, scores)
                ]
        return []


class DlibLandmarkDetector:
    """HOG face boxes + dlib's 68-point shape predictor (iBUG order)."""

    name = "dlib"

    def __init__(self, upsample_below: int = 400, threshold: float = 0.0, retry_below: int = 1024,
                 predictor_path: str | os.PathLike | None = None):
        import dlib

        self._dlib = dlib
        self._faces = DlibHogFaceDetector(upsample_below=upsample_below, threshold=threshold,
                                          retry_below=retry_below)
        self._predictor = dlib.shape_predictor(str(predictor_path or dlib_shape_predictor_path()))

    def fork(self) -> "DlibLandmarkDetector":
        """A copy for another thread: its own HOG detector (dlib's object_detector must not be used
        from two threads at once), the same shape predictor (read-only, safe to share)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        faces = self._faces
        clone._faces = DlibHogFaceDetector(upsample_below=faces.upsample_below, threshold=faces.threshold,
                                           retry_below=faces.retry_below)
        return clone

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        rgb = as_rgb_uint8(image)
        detections = []
        for box, score in self._faces.boxes(rgb):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            shape = self._predictor(rgb, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
            points = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
            detections.append(FaceDetection(box=box, score=score, landmarks=points))
        return largest_first(detections)


# ------------------------------------------------------------------------------ face-alignment

FACE_ALIGNMENT_DETECTORS = ("sfd", "blazeface", "dlib")


def _hub_checkpoint_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def face_alignment_weight_files(face_detector: str = "sfd") -> dict[str, str]:
    """{file name in the torch hub checkpoints dir: URL} that face-alignment needs (2-D FAN)."""
    from face_alignment.api import models_urls as fan_urls

    urls = [fan_urls["2DFAN-4"]]
    if face_detector == "sfd":
        from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls

        urls.append(sfd_urls["s3fd"])
    elif face_detector == "blazeface":
        from face_alignment.detection.blazeface.blazeface_detector import models_urls as bf_urls

        urls += [bf_urls["blazeface_weights"], bf_urls["blazeface_anchors"]]
    # "dlib": boxes come from our HOG detector, no file needed.
    return {os.path.basename(urlparse(url).path): url for url in urls}


def missing_face_alignment_files(face_detector: str = "sfd") -> dict[str, str]:
    folder = _hub_checkpoint_dir()
    return {name: url for name, url in face_alignment_weight_files(face_detector).items()
            if not (folder / name).is_file()}


def _missing_message(missing: dict[str, str], reason: str) -> str:
    folder = _hub_checkpoint_dir()
    listing = "; ".join(f"{name} (from {url})" for name, url in missing.items())
    return (f"face-alignment weights are missing ({reason}): {listing}. Place these files in {folder} "
            f"(the torch hub cache: set TORCH_HOME to choose it), or run once with network access "
            f"so face-alignment downloads them.")


class FaceAlignmentLandmarkDetector:
    """face-alignment's 2-D FAN on boxes from S3FD, BlazeFace or dlib's HOG detector."""

    name = "face-alignment"

    def __init__(self, device: str = "cpu", face_detector: str = "sfd", flip_input: bool = True,
                 allow_download: bool = True, upsample_below: int = 400):
        if face_detector not in FACE_ALIGNMENT_DETECTORS:
            raise ValueError(f"face_detector must be one of {FACE_ALIGNMENT_DETECTORS}, got {face_detector!r}")
        import face_alignment

        missing = missing_face_alignment_files(face_detector)
        if missing and not allow_download:
            raise LandmarkModelMissingError(_missing_message(missing, "downloads disabled"))
        self.face_detector = face_detector
        # dlib's HOG boxes are computed here (with upsampling and scores) and handed to FAN;
        # face-alignment's own "dlib" detector is constructed only because it needs one, and is
        # free on CPU (no weights).
        self._hog = DlibHogFaceDetector(upsample_below=upsample_below) if face_detector == "dlib" else None
        detector_kwargs = {}
        if face_detector == "dlib" and "cuda" in device:
            # On CUDA face-alignment's dlib detector would download dlib's CNN detector; the same
            # file ships with face_recognition_models.
            detector_kwargs["path_to_detector"] = str(dlib_model_path("mmod_human_face_detector.dat"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._fa = face_alignment.FaceAlignment(
                    face_alignment.LandmarksType.TWO_D, device=device, face_detector=face_detector,
                    face_detector_kwargs=detector_kwargs, flip_input=flip_input,
                    **self._compile_kwargs(face_alignment))
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            still_missing = missing_face_alignment_files(face_detector)
            if still_missing:
                raise LandmarkModelMissingError(_missing_message(still_missing, f"download failed: {exc}")) from exc
            raise

    @staticmethod
    def _compile_kwargs(face_alignment) -> dict:
        # face-alignment >= 1.5 torch.compile()s FAN by default: minutes of compiling and a C
        # toolchain on CPU workers, for little gain at our batch sizes. Older versions lack it.
        import inspect

        params = inspect.signature(face_alignment.FaceAlignment.__init__).parameters
        return {"compile": False} if "compile" in params else {}

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        rgb = as_rgb_uint8(image)
        boxes = None
        if self._hog is not None:
            found = self._hog.boxes(rgb)
            if not found:
                return []
            # float64: face-alignment writes box-derived numpy float32 scalars into torch tensors and fails.
            boxes = [np.append(box, score).astype(np.float64) for box, score in found]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No faces were detected." is an answer, not a warning
            landmarks, _, bboxes = self._fa.get_landmarks_from_image(
                rgb, detected_faces=boxes, return_bboxes=True, return_landmark_score=True)
        return detections_from_face_alignment(landmarks, bboxes)


def detections_from_face_alignment(landmarks, bboxes) -> list[FaceDetection]:
    """face-alignment's (landmarks list, boxes [x0, y0, x1, y1, score?]) -> FaceDetections,
    largest first. None (its "no face") -> []."""
    if landmarks is None or bboxes is None:
        return []
    if len(landmarks) != len(bboxes):
        raise ValueError(f"face-alignment returned {len(landmarks)} landmark sets for {len(bboxes)} boxes")
    detections = []
    for points, raw_box in zip(landmarks, bboxes):
        raw_box = np.asarray(raw_box, np.float32).ravel()
        points = np.asarray(points, np.float32)[:, :2]
        if points.shape != (NUM_LANDMARKS, 2):
            raise ValueError(f"expected {NUM_LANDMARKS} landmarks, got {points.shape}")
        score = float(raw_box[4]) if raw_box.size > 4 else 1.0
        detections.append(FaceDetection(box=raw_box[:4].copy(), score=score, landmarks=points))
    return largest_first(detections)


# --------------------------------------------------------------------------------------- threads

Item = TypeVar("Item")
Result = TypeVar("Result")


class ThreadedLandmarkDetector:
    """A forkable detector run on several threads: map() spreads a batch's per-image work over them.

    dlib's HOG scan and shape predictor release the GIL, so N threads use N cores (2 threads run
    1.9-2x one on 2 cores). All detection happens on the pool, each thread with its own fork of
    the detector; the forks are made here, so no request pays for loading one.
    """

    def __init__(self, detector, threads: int):
        self.name = detector.name
        self.threads = threads
        self._primary = detector
        self._forks: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            self._forks.put(detector.fork())
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="facedist-detect", initializer=self._claim_fork)

    def _claim_fork(self) -> None:
        """Runs once in each pool thread as it starts: it takes a fork for its own."""
        self._local.detector = self._forks.get_nowait()

    def _detect_here(self, image: np.ndarray) -> list[FaceDetection]:
        return self._local.detector.detect(image)

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        mine = getattr(self._local, "detector", None)
        if mine is not None:  # on this detector's pool already (inside map)
            return mine.detect(image)
        return self._pool.submit(self._detect_here, image).result()

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
        """[fn(item)] in order, on the pool; fn may call self.detect."""
        return list(self._pool.map(fn, items))


def map_images(detector, fn: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """[fn(item)] over a batch: on the detector's threads when it has them, else in this thread."""
    mapper = getattr(detector, "map", None)
    return mapper(fn, items) if mapper is not None else [fn(item) for item in items]


# --------------------------------------------------------------------------------------- factory

LANDMARK_DETECTORS = ("dlib", "face-alignment")


def make_landmark_detector(name: "str | LandmarkDetector" = "dlib", device: str = "cpu", threads: int = 1,
                           **options) -> LandmarkDetector:
    """Build a detector by name: "dlib" or "face-alignment" (options go to its constructor); a
    ready detector object passes through, so callers can share one. threads > 1 runs a batch's
    detection on that many threads (see ThreadedLandmarkDetector) when the detector can fork;
    face-alignment's torch models use torch's own threads instead."""
    if not isinstance(name, str):
        detector = name
    elif name == "dlib":
        detector = DlibLandmarkDetector(**options)
    elif name in ("face-alignment", "face_alignment", "fan"):
        detector = FaceAlignmentLandmarkDetector(device=device, **options)
    else:
        raise ValueError(f"unknown landmark detector {name!r}; choose one of {LANDMARK_DETECTORS}")
    if threads > 1 and hasattr(detector, "fork") and not isinstance(detector, ThreadedLandmarkDetector):
        return ThreadedLandmarkDetector(detector, threads)
    return detector
