"""Face detection + 68 landmarks: dlib on the real Yale photos, face-alignment on stand-in weights.

face-alignment downloads its weights from the internet on first use. Here TORCH_HOME points at a
temporary folder holding stand-in files of the exact names and formats it loads (state dicts of
its own FAN / S3FD modules): the package's real loading and inference code runs, never the network.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from facedist.images import decode_image
from facedist.landmarks import (
    DlibLandmarkDetector,
    FaceAlignmentLandmarkDetector,
    FaceDetection,
    LandmarkModelMissingError,
    ThreadedLandmarkDetector,
    detections_from_face_alignment,
    face_alignment_weight_files,
    make_landmark_detector,
)


@pytest.fixture(scope="module")
def dlib_detector():
    return DlibLandmarkDetector()


def _yale(yale_dir, name: str) -> np.ndarray:
    return decode_image((yale_dir / name).read_bytes())


def _two_faces(yale_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two Yale people side by side, the second at 0.6 scale; returns the image and where each
    pasted photo lies (x0, y0, x1, y1)."""
    big = _yale(yale_dir, "subject01.normal")
    small = cv2.resize(_yale(yale_dir, "subject02.happy"), None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    height, width = big.shape[:2]
    canvas = np.full((height, width + 20 + small.shape[1], 3), 128, np.uint8)
    canvas[:, :width] = big
    y = (height - small.shape[0]) // 2
    canvas[y:y + small.shape[0], width + 20:] = small
    big_region = np.array([0, 0, width, height], np.float32)
    small_region = np.array([width + 20, y, canvas.shape[1], y + small.shape[0]], np.float32)
    return canvas, big_region, small_region


def _inside(points: np.ndarray, region: np.ndarray, margin: float = 0.0) -> bool:
    x0, y0, x1, y1 = region
    return bool(((points[:, 0] >= x0 - margin) & (points[:, 0] <= x1 + margin)
                 & (points[:, 1] >= y0 - margin) & (points[:, 1] <= y1 + margin)).all())


def _check_detection(det: FaceDetection) -> None:
    assert det.box.shape == (4,) and det.box.dtype == np.float32
    assert det.landmarks.shape == (68, 2) and det.landmarks.dtype == np.float32
    assert np.isfinite(det.landmarks).all() and math.isfinite(det.score)
    assert det.box[2] > det.box[0] and det.box[3] > det.box[1]


# ---- dlib -------------------------------------------------------------------------------------

def test_dlib_face_and_plausible_landmarks(dlib_detector, yale_dir):
    faces = dlib_detector.detect(_yale(yale_dir, "subject05.normal"))
    assert len(faces) == 1
    face = faces[0]
    _check_detection(face)
    pts = face.landmarks
    width = face.box[2] - face.box[0]
    assert _inside(pts, face.box, margin=0.2 * width)
    # iBUG 68 order, image coordinates: subject's right eye (36-41) is on the image's left.
    right_eye, left_eye = pts[36:42].mean(0), pts[42:48].mean(0)
    nose_tip, mouth = pts[30], pts[48:68].mean(0)
    assert right_eye[0] < nose_tip[0] < left_eye[0]
    assert max(right_eye[1], left_eye[1]) < nose_tip[1] < mouth[1]
    assert pts[8, 1] > mouth[1]                           # chin below the mouth
    assert 0.3 * width < np.linalg.norm(pts[36] - pts[45]) < 0.9 * width


def test_dlib_finds_faces_in_yale(dlib_detector, yale_dir):
    files = sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject"))
    assert len(files) == 164
    found = sum(bool(dlib_detector.detect(decode_image(p.read_bytes()))) for p in files)
    assert found >= 0.95 * len(files), f"faces found in {found}/{len(files)}"


def test_dlib_no_face_gives_empty_list(dlib_detector):
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (9, 9), 3)
    assert dlib_detector.detect(noise) == []
    assert dlib_detector.detect(np.full((480, 640, 3), 200, np.uint8)) == []


def test_dlib_two_faces_largest_first(dlib_detector, yale_dir):
    image, big_region, small_region = _two_faces(yale_dir)
    faces = dlib_detector.detect(image)
    assert len(faces) == 2
    for face in faces:
        _check_detection(face)
    assert faces[0].area > faces[1].area
    assert _inside(faces[0].landmarks, big_region, margin=2)
    assert _inside(faces[1].landmarks, small_region, margin=2)


def test_dlib_accepts_grayscale_and_factory(yale_dir):
    detector = make_landmark_detector("dlib")
    gray = _yale(yale_dir, "subject03.normal")[..., 0]
    faces = detector.detect(gray)
    assert len(faces) == 1 and faces[0].landmarks.shape == (68, 2)
    with pytest.raises(ValueError, match="unknown landmark detector"):
        make_landmark_detector("mtcnn")


def test_threaded_dlib_matches_one_thread_with_a_detector_per_thread(dlib_detector, yale_dir):
    names = sorted(p.name for p in yale_dir.iterdir() if p.name.startswith("subject0"))[:12]
    images = [_yale(yale_dir, n) for n in names] + [np.full((120, 160, 3), 90, np.uint8)]  # + a non-face
    threaded = make_landmark_detector("dlib", threads=3)
    assert isinstance(threaded, ThreadedLandmarkDetector) and threaded.threads == 3
    used = set()

    def detect(image):
        used.add(id(threaded._local.detector))
        return threaded.detect(image)

    got = threaded.map(detect, images)
    want = [dlib_detector.detect(image) for image in images]
    assert [len(f) for f in got] == [len(f) for f in want] and len(got[-1]) == 0
    for faces, expected in zip(got[:-1], want[:-1]):
        np.testing.assert_array_equal(faces[0].box, expected[0].box)
        np.testing.assert_allclose(faces[0].landmarks, expected[0].landmarks)
    # Each pool thread detects with its own fork: dlib's HOG detector is not safe to share.
    assert 1 < len(used) <= 3 and id(threaded._primary) not in used
    # Outside map(), detect() runs on the pool too; never on the shared primary.
    np.testing.assert_array_equal(threaded.detect(images[0])[0].box, want[0][0].box)
    assert make_landmark_detector(threaded, threads=2) is threaded


# ---- face-alignment ---------------------------------------------------------------------------

def _write_fan_standin(folder) -> None:
    """face-alignment's 2-D FAN with random (seeded) weights, saved the way it loads them."""
    import torch
    from face_alignment.models import FAN

    torch.manual_seed(0)
    names = face_alignment_weight_files("dlib")
    (name,) = [n for n in names if n.startswith("2DFAN4")]
    torch.save(FAN(4).state_dict(), folder / name)


def _write_s3fd_standin(folder, face_logit_coarsest: float | None) -> None:
    """S3FD whose every weight is zero, so each head outputs its bias everywhere: all levels say
    "no face", except (optionally) the coarsest, which then proposes 512-px anchors."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd

    state = {k: torch.zeros_like(v) for k, v in s3fd().state_dict().items()}
    for key in state:
        if key.endswith("mbox_conf.bias"):
            state[key][-1] = -10.0  # face logit (softmax vs background 0)
    if face_logit_coarsest is not None:
        state["conv7_2_mbox_conf.bias"][1] = face_logit_coarsest
    (name,) = [n for n in face_alignment_weight_files("sfd") if n.startswith("s3fd")]
    torch.save(state, folder / name)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME holding the stand-in FAN; restores the previous value afterwards."""
    import torch.hub

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    _write_fan_standin(checkpoints)
    saved = torch.hub.get_dir()
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(home))
    torch.hub.set_dir(str(home / "hub"))
    yield checkpoints
    mp.undo()
    torch.hub.set_dir(saved)


@pytest.fixture(scope="module")
def fa_dlib_boxes(torch_home):
    return FaceAlignmentLandmarkDetector(device="cpu", face_detector="dlib", flip_input=False,
                                         allow_download=False)


def test_face_alignment_missing_weights_clear_error(tmp_path, monkeypatch):
    import torch.hub

    saved = torch.hub.get_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(LandmarkModelMissingError) as info:
            FaceAlignmentLandmarkDetector(face_detector="sfd", allow_download=False)
    finally:
        torch.hub.set_dir(saved)
    message = str(info.value)
    assert "2DFAN4-11f355bf06.pth.tar" in message and "s3fd-619a316812.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "TORCH_HOME" in message


def test_face_alignment_two_faces_largest_first(fa_dlib_boxes, dlib_detector, yale_dir):
    image, big_region, small_region = _two_faces(yale_dir)
    faces = fa_dlib_boxes.detect(image)
    assert len(faces) == 2
    for face in faces:
        _check_detection(face)
    assert faces[0].area > faces[1].area
    # Same boxes and scores as dlib's detector (face-alignment got dlib's boxes) ...
    reference = dlib_detector.detect(image)
    for face, ref in zip(faces, reference):
        np.testing.assert_allclose(face.box, ref.box)
        assert face.score == pytest.approx(ref.score)
    # ... and landmarks in image coordinates around each face (FAN crops ~2x the box; random
    # stand-in weights put points anywhere in that crop, never in the other face's crop).
    for face in faces:
        centre = (face.box[:2] + face.box[2:]) / 2
        width = face.box[2] - face.box[0]
        assert np.abs(face.landmarks - centre).max() <= 1.2 * width
    assert faces[0].landmarks[:, 0].mean() < small_region[0] < faces[1].landmarks[:, 0].mean()


def test_face_alignment_no_face(fa_dlib_boxes):
    assert fa_dlib_boxes.detect(np.full((240, 320, 3), 90, np.uint8)) == []


def test_face_alignment_with_sfd_detector(torch_home):
    # Nothing above threshold at any level: face-alignment's "no face" (None) becomes [].
    _write_s3fd_standin(torch_home, face_logit_coarsest=None)
    quiet = make_landmark_detector("face-alignment", face_detector="sfd", flip_input=False, allow_download=False)
    assert quiet.detect(np.full((64, 64, 3), 90, np.uint8)) == []
    # The coarsest level fires with p = sigmoid(2): NMS leaves one 512-px anchor box.
    _write_s3fd_standin(torch_home, face_logit_coarsest=2.0)
    loud = make_landmark_detector("face-alignment", face_detector="sfd", flip_input=False, allow_download=False)
    faces = loud.detect(np.full((64, 64, 3), 90, np.uint8))
    assert len(faces) == 1
    _check_detection(faces[0])
    np.testing.assert_allclose(faces[0].box[2:] - faces[0].box[:2], [512, 512], atol=1e-3)
    assert faces[0].score == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-5)


def test_detections_from_face_alignment_output_order():
    rng = np.random.default_rng(0)
    landmarks = [rng.random((68, 2)) * 50, rng.random((68, 3)) * 200, rng.random((68, 2)) * 100]
    boxes = [np.array([0, 0, 50, 50, 0.99]), np.array([0, 0, 200, 200, 0.7]), [0, 0, 100, 100, 0.8]]
    faces = detections_from_face_alignment(landmarks, boxes)
    assert [f.score for f in faces] == pytest.approx([0.7, 0.8, 0.99])  # largest box first
    assert all(f.landmarks.shape == (68, 2) for f in faces)               # 3-D points -> x, y
    np.testing.assert_allclose(faces[0].landmarks, landmarks[1][:, :2].astype(np.float32))
    assert detections_from_face_alignment(None, None) == []
    with pytest.raises(ValueError, match="expected 68 landmarks"):
        detections_from_face_alignment([np.zeros((5, 2))], [np.array([0, 0, 1, 1, 1.0])])
