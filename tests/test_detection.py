"""Face detection: dlib's HOG detector on the real Yale photos, the thread pool, the factory.

(FaceBoxes, the default detector, is checked separately.)
"""

from __future__ import annotations

import math
import threading

import cv2
import numpy as np
import pytest

from facedist.detection import (
    DETECTORS,
    DlibHogDetector,
    FaceBox,
    ThreadLocalPool,
    largest_first,
    make_face_detector,
)
from facedist.images import decode_image
from support.faces import two_faces, yale_image


@pytest.fixture(scope="module")
def dlib_detector():
    return DlibHogDetector()


def _box_inside(box: np.ndarray, region: np.ndarray, margin: float = 0.0) -> bool:
    x0, y0, x1, y1 = (float(v) for v in box)
    rx0, ry0, rx1, ry1 = (float(v) for v in region)
    return rx0 - margin <= x0 < x1 <= rx1 + margin and ry0 - margin <= y0 < y1 <= ry1 + margin


def _check_face(face: FaceBox) -> None:
    assert isinstance(face, FaceBox)
    assert face.box.shape == (4,) and face.box.dtype == np.float32
    assert np.isfinite(face.box).all() and math.isfinite(face.score)
    assert face.box[2] > face.box[0] and face.box[3] > face.box[1]


# ---- dlib HOG -----------------------------------------------------------------------------------

def test_dlib_one_face_with_a_plausible_box(dlib_detector, yale_dir):
    image = yale_image(yale_dir, "subject05.normal")
    (faces,) = dlib_detector.detect_batch([image])
    assert len(faces) == 1
    face = faces[0]
    _check_face(face)
    h, w = image.shape[:2]
    side = face.box[2] - face.box[0]
    # a face box, not the whole photo nor a speck: Yale faces are roughly a third of the width
    assert 0.15 * w < side < 0.8 * w
    assert _box_inside(face.box, np.array([0, 0, w, h]), margin=0.1 * side)
    assert face.area == pytest.approx(float((face.box[2] - face.box[0]) * (face.box[3] - face.box[1])))


@pytest.mark.slow  # dlib HOG over Yale photos
def test_dlib_finds_faces_inyale_image(dlib_detector, yale_dir):
    files = sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject"))
    assert len(files) == 164
    found = dlib_detector.detect_batch([decode_image(p.read_bytes()) for p in files])
    assert len(found) == len(files)
    hits = sum(bool(faces) for faces in found)
    print(f"\ndlib HOG on Yale: faces in {hits}/{len(files)}")
    assert hits >= 0.95 * len(files), f"faces found in {hits}/{len(files)}"
    for faces in found:
        for face in faces:
            _check_face(face)


def test_dlib_no_face_gives_empty_list(dlib_detector):
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (9, 9), 3)
    flat = np.full((480, 640, 3), 200, np.uint8)
    assert dlib_detector.detect_batch([noise, flat]) == [[], []]
    assert dlib_detector.detect_batch([]) == []


def test_dlib_two_faces_largest_first(dlib_detector, yale_dir):
    image, big_region, small_region = two_faces(yale_dir)
    (faces,) = dlib_detector.detect_batch([image])
    assert len(faces) == 2
    for face in faces:
        _check_face(face)
    assert faces[0].area > faces[1].area
    assert _box_inside(faces[0].box, big_region, margin=2)
    assert _box_inside(faces[1].box, small_region, margin=2)


def test_dlib_accepts_grayscale(dlib_detector, yale_dir):
    rgb = yale_image(yale_dir, "subject03.normal")
    gray = rgb[..., 0]
    got = dlib_detector.detect_batch([gray, gray[:, :, None]])
    assert [len(faces) for faces in got] == [1, 1]
    _check_face(got[0][0])
    np.testing.assert_array_equal(got[0][0].box, got[1][0].box)
    # Yale is grey already: the same box as the 3-channel photo
    np.testing.assert_array_equal(got[0][0].box, dlib_detector.detect_batch([rgb])[0][0].box)


@pytest.mark.slow  # dlib HOG over Yale photos twice
def test_threaded_dlib_matches_one_thread_in_input_order(dlib_detector, yale_dir):
    names = sorted(p.name for p in yale_dir.iterdir() if p.name.startswith("subject0"))[:12]
    images = [yale_image(yale_dir, n) for n in names]
    images.insert(5, np.full((120, 160, 3), 90, np.uint8))  # a non-face mid-batch
    threaded = make_face_detector("dlib", threads=3)
    assert isinstance(threaded, DlibHogDetector) and threaded.threads == 3
    got = threaded.detect_batch(images)
    want = dlib_detector.detect_batch(images)
    assert [len(f) for f in got] == [len(f) for f in want] and got[5] == []
    assert sum(bool(f) for f in want) >= 11
    for faces, expected in zip(got, want):
        for face, ref in zip(faces, expected):
            np.testing.assert_array_equal(face.box, ref.box)
            assert face.score == pytest.approx(ref.score)
    # the same detector again: still the same answer (the pool's workers are reused)
    again = threaded.detect_batch(images[:3])
    for faces, expected in zip(again, want[:3]):
        np.testing.assert_array_equal(faces[0].box, expected[0].box)


# ---- the thread pool ----------------------------------------------------------------------------

def test_thread_local_pool_gives_each_thread_its_own_worker_in_input_order():
    made = []

    def factory():
        worker = object()
        made.append(worker)
        return worker

    pool = ThreadLocalPool(factory, threads=3)
    assert pool.threads == 3 and len(made) == 3  # all workers made up front, none per call
    seen: dict[int, set[int]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(3, timeout=30)  # the first three items run at once, on three threads

    def work(worker, item):
        if item < 3:
            barrier.wait()
        with lock:
            seen.setdefault(threading.get_ident(), set()).add(id(worker))
        return item * 10

    items = list(range(20))
    assert pool.map(work, items) == [i * 10 for i in items]
    assert len(seen) == 3
    # each thread always used one worker, no two threads shared one, and all were made by factory
    assert all(len(workers) == 1 for workers in seen.values())
    used = set().union(*seen.values())
    assert len(used) == 3 and used == {id(w) for w in made}
    assert len(made) == 3
    assert ThreadLocalPool(object, threads=0).threads == 1


# ---- helpers and the factory --------------------------------------------------------------------

def test_largest_first_sorts_by_area_then_score():
    small = FaceBox(np.float32([0, 0, 10, 10]), 0.99)
    big_low = FaceBox(np.float32([0, 0, 30, 20]), 0.2)
    big_high = FaceBox(np.float32([5, 5, 25, 35]), 0.9)  # 20 x 30: same area as big_low
    inverted = FaceBox(np.float32([10, 10, 0, 0]), 1.0)  # degenerate: area 0
    assert inverted.area == 0 and big_low.area == big_high.area == 600
    assert largest_first([small, inverted, big_low, big_high]) == [big_high, big_low, small, inverted]


def test_make_face_detector_passes_objects_and_rejects_unknown_names():
    class Scripted:
        name, version = "scripted", "1"

        def detect_batch(self, images):
            return [[] for _ in images]

    scripted = Scripted()
    assert make_face_detector(scripted) is scripted
    assert make_face_detector(scripted, device="cuda", threads=4) is scripted
    assert set(DETECTORS) == {"faceboxes", "dlib"}
    dlib_one = make_face_detector("dlib")
    assert isinstance(dlib_one, DlibHogDetector) and dlib_one.threads == 1
    assert dlib_one.name == "dlib" and dlib_one.version.startswith("hog:dlib-")
    with pytest.raises(ValueError, match="unknown face detector 'mtcnn'"):
        make_face_detector("mtcnn")
