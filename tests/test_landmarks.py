"""68 landmarks on given face boxes: dlib's shape predictor on the real Yale photos (boxes from dlib's
HOG detector), face-alignment's FAN on stand-in weights.

face-alignment downloads its weights from the internet on first use. Here TORCH_HOME points at a
temporary folder holding a stand-in file of the exact name and format it loads (a state dict of
its own FAN module): the package's real loading and inference code runs, never the network.
"""

from __future__ import annotations

import numpy as np
import pytest

from facedist.detection import DlibHogDetector
from support.faces import two_faces, yale_image  # the same Yale photos and two-face composite
from facedist.landmarks import (
    DlibShapePredictor,
    FaceAlignmentPredictor,
    LandmarkModelMissingError,
    face_alignment_weight_files,
    landmarks_from_face_alignment,
    make_landmark_predictor,
    missing_face_alignment_files,
)


@pytest.fixture(scope="module")
def hog():
    return DlibHogDetector()


@pytest.fixture(scope="module")
def dlib_predictor():
    return DlibShapePredictor()


def _inside(points: np.ndarray, region: np.ndarray, margin: float = 0.0) -> bool:
    x0, y0, x1, y1 = region
    return bool(((points[:, 0] >= x0 - margin) & (points[:, 0] <= x1 + margin)
                 & (points[:, 1] >= y0 - margin) & (points[:, 1] <= y1 + margin)).all())


def _check_landmarks(points: np.ndarray) -> None:
    assert points.shape == (68, 2) and points.dtype == np.float32
    assert np.isfinite(points).all()


# ---- dlib -------------------------------------------------------------------------------------

def test_dlib_plausible_landmarks_on_a_dlib_box(hog, dlib_predictor, yale_dir):
    image = yale_image(yale_dir, "subject05.normal")
    (faces,) = hog.detect_batch([image])
    assert len(faces) == 1
    box = faces[0].box
    (pts,) = dlib_predictor.predict_batch([image], [box])
    _check_landmarks(pts)
    width = box[2] - box[0]
    assert _inside(pts, box, margin=0.2 * width)
    # iBUG 68 order, image coordinates: subject's right eye (36-41) is on the image's left.
    right_eye, left_eye = pts[36:42].mean(0), pts[42:48].mean(0)
    nose_tip, mouth = pts[30], pts[48:68].mean(0)
    assert right_eye[0] < nose_tip[0] < left_eye[0]
    assert max(right_eye[1], left_eye[1]) < nose_tip[1] < mouth[1]
    assert pts[8, 1] > mouth[1]                           # chin below the mouth
    assert 0.3 * width < np.linalg.norm(pts[36] - pts[45]) < 0.9 * width
    assert dlib_predictor.name == "dlib" and "shape_predictor_68_face_landmarks" in dlib_predictor.version


def test_dlib_landmarks_follow_each_box_oftwo_faces(hog, dlib_predictor, yale_dir):
    image, big_region, small_region = two_faces(yale_dir)
    (faces,) = hog.detect_batch([image])
    assert len(faces) == 2
    big, small = dlib_predictor.predict_batch([image, image], [faces[0].box, faces[1].box])
    _check_landmarks(big)
    _check_landmarks(small)
    assert _inside(big, big_region, margin=2)
    assert _inside(small, small_region, margin=2)


def test_dlib_accepts_grayscale(hog, dlib_predictor, yale_dir):
    rgb = yale_image(yale_dir, "subject03.normal")
    box = hog.detect_batch([rgb])[0][0].box
    gray, same = dlib_predictor.predict_batch([rgb[..., 0], rgb], [box, box])
    _check_landmarks(gray)
    np.testing.assert_array_equal(gray, same)  # Yale is grey: the same points


def test_landmark_predictor_factory():
    class Scripted:
        name, version = "scripted", "1"

        def predict_batch(self, images, boxes):
            return [np.zeros((68, 2), np.float32) for _ in images]

    scripted = Scripted()
    assert make_landmark_predictor(scripted) is scripted
    with pytest.raises(ValueError, match="unknown landmark predictor 'mtcnn'"):
        make_landmark_predictor("mtcnn")


# ---- face-alignment ---------------------------------------------------------------------------

def _write_fan_standin(folder) -> None:
    """face-alignment's 2-D FAN with random (seeded) weights, saved the way it loads them."""
    import torch
    from face_alignment.models import FAN

    torch.manual_seed(0)
    (name,) = [n for n in face_alignment_weight_files() if n.startswith("2DFAN4")]
    torch.save(FAN(4).state_dict(), folder / name)


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
def fan(torch_home):
    return FaceAlignmentPredictor(device="cpu", flip_input=False, allow_download=False)


def test_face_alignment_needs_only_fan_weights(torch_home):
    names = face_alignment_weight_files()
    assert list(names) == ["2DFAN4-11f355bf06.pth.tar"]  # no S3FD: face-alignment's detectors are not used
    assert missing_face_alignment_files() == {}


def test_face_alignment_missing_weights_clear_error(tmp_path, monkeypatch):
    import torch.hub

    saved = torch.hub.get_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        assert list(missing_face_alignment_files()) == ["2DFAN4-11f355bf06.pth.tar"]
        with pytest.raises(LandmarkModelMissingError) as info:
            FaceAlignmentPredictor(allow_download=False)
    finally:
        torch.hub.set_dir(saved)
    message = str(info.value)
    assert "2DFAN4-11f355bf06.pth.tar" in message and "s3fd" not in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "TORCH_HOME" in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.slow  # FAN on CPU
def test_face_alignment_landmarks_around_each_given_box(fan, hog, yale_dir):
    image, big_region, small_region = two_faces(yale_dir)
    (faces,) = hog.detect_batch([image])
    assert len(faces) == 2
    boxes = [faces[0].box, faces[1].box]
    points = fan.predict_batch([image, image], boxes)
    assert len(points) == 2
    # landmarks in image coordinates around each box (FAN crops ~2x the box; random stand-in
    # weights put points anywhere in that crop, never in the other face's crop)
    for pts, box in zip(points, boxes):
        _check_landmarks(pts)
        centre = (box[:2] + box[2:]) / 2
        width = box[2] - box[0]
        assert np.abs(pts - centre).max() <= 1.2 * width
    assert points[0][:, 0].mean() < small_region[0] < points[1][:, 0].mean()
    # the box alone decides: the same box on its own gives the same points
    np.testing.assert_allclose(fan.predict_batch([image], [boxes[1]])[0], points[1], atol=1e-4)
    assert fan.name == "face-alignment" and "2DFAN4" in fan.version


@pytest.mark.slow  # FAN on CPU
def test_face_alignment_through_the_factory(torch_home, yale_dir):
    predictor = make_landmark_predictor("face-alignment", flip_input=False, allow_download=False)
    assert isinstance(predictor, FaceAlignmentPredictor)
    image = yale_image(yale_dir, "subject05.normal")
    box = np.array([100, 60, 220, 180], np.float32)  # any box: FAN runs on what it is given
    (pts,) = predictor.predict_batch([image], [box])
    _check_landmarks(pts)
    # FAN's crop: 2.05 x the side, centred 0.12 x the side above the box centre
    assert np.abs(pts - [160, 120]).max() <= 1.2 * 120


def test_landmarks_from_face_alignment_edge_cases():
    rng = np.random.default_rng(0)
    three_d = rng.random((68, 3)) * 200
    got = landmarks_from_face_alignment([three_d])              # 3-D points -> x, y
    assert got.shape == (68, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, three_d[:, :2].astype(np.float32))
    np.testing.assert_allclose(landmarks_from_face_alignment((rng.random((68, 2)),)).shape, (68, 2))
    with pytest.raises(ValueError, match="returned 0 landmark sets"):
        landmarks_from_face_alignment(None)
    with pytest.raises(ValueError, match="returned 0 landmark sets"):
        landmarks_from_face_alignment([])
    with pytest.raises(ValueError, match="returned 2 landmark sets"):
        landmarks_from_face_alignment([three_d, three_d])
    with pytest.raises(ValueError, match="expected 68 landmarks"):
        landmarks_from_face_alignment([np.zeros((5, 2))])
