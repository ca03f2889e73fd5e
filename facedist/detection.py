"""Face detection behind one interface: a batch of images in, the faces of each image out.

Two detectors:
  * FaceBoxesDetector (the default): 3DDFA_V2's FaceBoxes on torch. A batch of images of any
    sizes runs as a few batched forwards (images bucketed by padded size), on the GPU when the
    extractor has one. This is the detector 3DDFA_V2's regressor expects its boxes from.
  * DlibHogDetector: dlib's HOG + linear SVM frontal detector, one image at a time on CPU
    threads (dlib releases the GIL). Kept for comparison and for machines without torch speed.

Both return every face of an image, largest box first, as FaceBox; [] when there is none. The 68
landmarks are a separate step (facedist.landmarks, or the regressor itself for tddfa).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, Sequence, TypeVar

import numpy as np

from facedist import assets
from facedist.images import as_rgb_uint8

FACEBOXES_CHECKPOINT = "faceboxes/FaceBoxesProd.pth"


@dataclass
class FaceBox:
    """One detected face: box (x0, y0, x1, y1) in pixels and the detector's score."""

    box: np.ndarray  # (4,) float32
    score: float

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.box)
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


class FaceDetector(Protocol):
    name: str
    version: str  # recorded with the coefficients, so a resumed run cannot mix detectors

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceBox]]:
        """RGB uint8 (H, W, 3) images in; for each, all faces, largest box first ([] if none)."""
        ...


def largest_first(faces: Sequence[FaceBox]) -> list[FaceBox]:
    """Sort by box area, descending; ties keep the higher score first."""
    return sorted(faces, key=lambda f: (-f.area, -f.score))


# ------------------------------------------------------------------------------------ threads

Worker = TypeVar("Worker")
Item = TypeVar("Item")
Result = TypeVar("Result")


class ThreadLocalPool(Generic[Worker]):
    """A thread pool whose threads each own one worker object, made by `factory` when the pool is
    built (so no request pays for it). For models that release the GIL but must not be shared
    between threads, such as dlib's object_detector."""

    def __init__(self, factory: Callable[[], Worker], threads: int):
        self.threads = max(1, int(threads))
        self._workers: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.threads):
            self._workers.put(factory())
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="facedist-detect",
                                        initializer=self._claim)

    def _claim(self) -> None:
        self._local.worker = self._workers.get_nowait()

    def _call(self, fn: Callable[[Worker, Item], Result], item: Item) -> Result:
        return fn(self._local.worker, item)

    def map(self, fn: Callable[[Worker, Item], Result], items: Sequence[Item]) -> list[Result]:
        """[fn(worker, item)] in input order, each on a pool thread with that thread's worker."""
        return list(self._pool.map(lambda item: self._call(fn, item), items))


# ----------------------------------------------------------------------------------- FaceBoxes


class FaceBoxesDetector:
    """FaceBoxes (3DDFA_V2's weights, loaded strictly) on torch, batched over images."""

    name = "faceboxes"

    def __init__(self, device: str = "cpu", *, checkpoint: str = FACEBOXES_CHECKPOINT,
                 config=None, max_batch: int | None = None):
        import torch

        from facedist.models.faceboxes import FaceBoxesConfig, fuse_for_inference, load_faceboxes

        self.device = torch.device(device)
        path = assets.resolve(checkpoint)
        self.net = load_faceboxes(path, device=self.device)  # the checkpoint, loaded strictly
        self.infer_net = fuse_for_inference(self.net)         # BN folded, channels-last: what runs
        self.config = config or FaceBoxesConfig()
        # Images per forward: small on CPU (activations stay in cache), large on a GPU.
        self.max_batch = max_batch or (16 if self.device.type == "cpu" else 64)
        self.version = f"{path.stem}:{assets.sha256_of(path)[:12]}"

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceBox]]:
        from facedist.models.faceboxes import detect_faces
        from facedist.models.layers import full_precision

        rgbs = [as_rgb_uint8(image) for image in images]
        with full_precision():  # the same boxes on a GPU as on a CPU (no TF32)
            found = detect_faces(self.infer_net, rgbs, self.config, device=self.device, max_batch=self.max_batch)
        return [largest_first([FaceBox(box.astype(np.float32), float(score))
                               for box, score in zip(boxes, scores)])
                for boxes, scores in found]


# ---------------------------------------------------------------------------------------- dlib


class _DlibHogOneThread:
    """dlib's HOG + linear SVM frontal face detector, with scores, for one thread.

    Small photos (longest side < upsample_below) are upsampled once: HOG's smallest window is
    80 px, about the size of the faces in Yale's 320x243 images. When a pass finds nothing, an
    image up to retry_below px gets one more pass at the other scale (this recovers faces in
    harsh side light that only one of the two scales finds).
    """

    def __init__(self, upsample_below: int = 400, threshold: float = 0.0, retry_below: int = 1024):
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self.upsample_below = upsample_below
        self.threshold = threshold
        self.retry_below = retry_below

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        longest = max(rgb.shape[:2])
        passes = [1, 0] if longest < self.upsample_below else [0, 1]
        if longest >= self.retry_below:
            passes = passes[:1]
        for upsample in passes:
            rects, scores, _ = self._detector.run(rgb, upsample, self.threshold)
            if len(rects):
                return largest_first([
                    FaceBox(np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float32), float(s))
                    for r, s in zip(rects, scores)])
        return []


class DlibHogDetector:
    """dlib's HOG detector over a batch, one image per thread (each thread its own detector)."""

    name = "dlib"

    def __init__(self, threads: int = 1, upsample_below: int = 400, threshold: float = 0.0,
                 retry_below: int = 1024):
        import dlib

        options = dict(upsample_below=upsample_below, threshold=threshold, retry_below=retry_below)
        self.threads = max(1, int(threads))
        self._single = _DlibHogOneThread(**options) if self.threads == 1 else None
        self._pool = (ThreadLocalPool(lambda: _DlibHogOneThread(**options), self.threads)
                      if self.threads > 1 else None)
        self.version = f"hog:dlib-{dlib.__version__}"

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceBox]]:
        rgbs = [as_rgb_uint8(image) for image in images]
        if self._pool is None:
            return [self._single.detect(rgb) for rgb in rgbs]
        return self._pool.map(lambda detector, rgb: detector.detect(rgb), rgbs)


# ------------------------------------------------------------------------------------- factory

DETECTORS = ("faceboxes", "dlib")
DEFAULT_DETECTOR = "faceboxes"


def make_face_detector(name: "str | FaceDetector" = DEFAULT_DETECTOR, device: str = "cpu",
                       threads: int = 1, **options) -> FaceDetector:
    """A detector by name (options go to its constructor); a ready detector passes through, so
    callers can share one. threads: CPU threads for dlib; FaceBoxes uses torch's own."""
    if not isinstance(name, str):
        return name
    if name == "faceboxes":
        return FaceBoxesDetector(device=device, **options)
    if name == "dlib":
        return DlibHogDetector(threads=threads, **options)
    raise ValueError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTORS)}")
