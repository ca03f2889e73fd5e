"""3DDFA_V2 MobileNetV1 and the tddfa extractor: strict checkpoints, crop geometry, pose, real faces."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from facedist import assets
from facedist.detection import FaceBox
from facedist.extractors import make_extractor
from facedist.extractors.base import landmark_error
from facedist.extractors.tddfa import (CROP_SIZE, crop_resize, pixel_affine, pose_from_affine,
                                       roi_box_from_bbox, roi_box_from_landmarks)
from facedist.images import decode_image
from facedist.models.mobilenet import MobileNetV1, fuse_for_inference, load_mobilenet, widen_factor_of
from facedist.morphable import angles_to_rotation
from facedist.schema import STATUS_ERROR, STATUS_NO_FACE, STATUS_OK, rows_to_table


@pytest.fixture(scope="module")
def mb05_path():
    return assets.resolve("tddfa/mb05_120x120.pth")


@pytest.fixture(scope="module")
def extractor():
    return make_extractor("tddfa", detector="dlib")


# ------------------------------------------------------------------------------- the network


def test_mb05_checkpoint_loads_strictly(mb05_path):
    raw = torch.load(mb05_path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in raw)
    model = load_mobilenet(mb05_path)
    assert model.num_features == 512 and widen_factor_of(raw) == 0.5
    # every checkpoint tensor landed, bit for bit
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, raw["module." + key], rtol=0, atol=0)
    # strictness: a missing key is an error, not a silently random layer
    partial = {k[len("module."):]: v for k, v in raw.items() if "dw6.bn_sep" not in k}
    with pytest.raises(RuntimeError, match="Missing key"):
        MobileNetV1(0.5).load_state_dict(partial, strict=True)
    out = model(torch.zeros(2, 3, CROP_SIZE, CROP_SIZE))
    assert out.shape == (2, 62) and torch.isfinite(out).all()


def test_mb1_state_dict_round_trips_strictly(tmp_path):
    torch.manual_seed(0)
    mb1 = MobileNetV1(widen_factor=1.0).eval()
    for module in mb1.modules():  # non-trivial BN statistics so eval outputs depend on them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "mb1_120x120.pth"
    # saved the way 3DDFA_V2 ships it: DataParallel prefix under 'state_dict'
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in mb1.state_dict().items()}}, path)
    loaded = load_mobilenet(path)
    assert loaded.num_features == 1024 and loaded.conv1.out_channels == 32
    x = torch.randn(3, 3, CROP_SIZE, CROP_SIZE)
    with torch.inference_mode():
        params, feat = loaded.forward_with_features(x)
        torch.testing.assert_close(params, mb1(x))
    assert feat.shape == (3, 1024)


def test_fused_inference_copy_matches_checkpoint_model(mb05_path):
    model = load_mobilenet(mb05_path)
    fused = fuse_for_inference(model)
    x = torch.randn(4, 3, CROP_SIZE, CROP_SIZE)
    with torch.inference_mode():
        p0, f0 = model.forward_with_features(x)
        p1, f1 = fused.forward_with_features(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f1, f0, rtol=1e-4, atol=1e-4)
    assert set(model.state_dict()) != set(fused.state_dict())  # the original keeps checkpoint keys
    # folded convs are created where the model lives (device and dtype), not on CPU float32
    assert {p.dtype for p in fuse_for_inference(model.double()).parameters()} == {torch.float64}


# ------------------------------------------------------------------------------ crop geometry


def test_roi_box_from_bbox_matches_3ddfa_v2():
    # old_size = (100 + 120) / 2 = 110; centre (60, 80 + 15.4); size int(173.8) = 173
    np.testing.assert_allclose(roi_box_from_bbox([10, 20, 110, 140]),
                               [60 - 86.5, 95.4 - 86.5, 60 + 86.5, 95.4 + 86.5])


def test_roi_box_from_landmarks_matches_3ddfa_v2():
    pts = np.array([[10, 30], [50, 30], [30, 110]], float)  # box 40 x 80 -> square 80, centre (30, 70)
    side = np.sqrt(2) * 80
    np.testing.assert_allclose(roi_box_from_landmarks(pts), [30 - side / 2, 70 - side / 2, 30 + side / 2, 70 + side / 2])


def _reference_crop(img, roi_box, size=CROP_SIZE):
    """3DDFA_V2's crop_img (zero padding) + cv2.resize, as upstream does it."""
    h, w = img.shape[:2]
    sx, sy, ex, ey = [int(round(v)) for v in roi_box]
    res = np.zeros((ey - sy, ex - sx, 3), np.uint8)
    dsx, dsy = max(0, -sx), max(0, -sy)
    cx0, cy0, cx1, cy1 = max(sx, 0), max(sy, 0), min(ex, w), min(ey, h)
    res[dsy:dsy + cy1 - cy0, dsx:dsx + cx1 - cx0] = img[cy0:cy1, cx0:cx1]
    return cv2.resize(res, (size, size), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize("roi_box", [(20.3, 30.7, 260.3, 270.7), (-50, -20, 190, 220), (100, 60, 400, 360)])
def test_crop_resize_equals_crop_pad_and_resize(roi_box):
    rng = np.random.default_rng(0)
    # a smooth image, so a half-pixel difference in sampling would show
    base = cv2.resize(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (320, 240), interpolation=cv2.INTER_CUBIC)
    ours = crop_resize(base, roi_box).astype(int)
    ref = _reference_crop(base, roi_box).astype(int)
    assert ours.shape == (CROP_SIZE, CROP_SIZE, 3)
    # identical away from the image border (where resize replicates the padded crop's edge)
    assert np.median(np.abs(ours - ref)) <= 1 and np.mean(np.abs(ours - ref) <= 2) > 0.97
    if roi_box[0] < 0:  # outside the image is black
        k = int(-roi_box[0] / (roi_box[2] - roi_box[0]) * CROP_SIZE) - 1
        assert ours[:, :k].max() == 0


def _similar_transform(pts3d, roi_box, size):
    """3DDFA_V2's utils/tddfa_util.similar_transform (reference for pixel_affine)."""
    pts3d = pts3d.copy()
    pts3d[0, :] -= 1
    pts3d[2, :] -= 1
    pts3d[1, :] = size - pts3d[1, :]
    sx, sy, ex, ey = roi_box
    scale_x, scale_y = (ex - sx) / size, (ey - sy) / size
    pts3d[0, :] = pts3d[0, :] * scale_x + sx
    pts3d[1, :] = pts3d[1, :] * scale_y + sy
    pts3d[2, :] *= (scale_x + scale_y) / 2
    return pts3d


def test_pixel_affine_equals_3ddfa_similar_transform():
    rng = np.random.default_rng(0)
    P = np.hstack([4e-4 * angles_to_rotation(10, 5, -3), [[60], [70], [-60]]])
    X = rng.normal(0, 5e4, (20, 3))
    roi = (33.0, 41.5, 213.0, 221.5)
    ref = _similar_transform(P[:, :3] @ X.T + P[:, 3:], roi, CROP_SIZE).T
    ours = X @ pixel_affine(P, roi)[:, :3].T + pixel_affine(P, roi)[:, 3]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-6)


def test_pose_angles_of_a_known_rotation():
    yaw, pitch, roll = 30.0, -12.0, 7.0
    P = np.hstack([5e-4 * angles_to_rotation(yaw, pitch, roll), [[60], [62], [-50]]])
    pose = pose_from_affine(pixel_affine(P, (10, 20, 250, 260)))
    np.testing.assert_allclose(pose.angles, (yaw, pitch, roll), atol=1e-6)
    assert pose.scale == pytest.approx(5e-4 * 2.0)  # roi 240 px for the 120 px crop


# ------------------------------------------------------------------------------ the extractor


def test_extractor_bad_input_gets_its_own_row(extractor):
    blank = np.full((200, 200, 3), 128, np.uint8)
    results = extractor.extract([blank, np.zeros((10, 10, 3), np.float32), np.zeros((5, 5, 7), np.uint8)])
    assert [r.status for r in results] == [STATUS_NO_FACE, STATUS_ERROR, STATUS_ERROR]
    assert "uint8" in results[1].message and "shape" in results[2].message
    assert extractor.extract([]) == []
    layout = extractor.layout
    assert (layout.n_id, layout.n_exp, layout.n_feature) == (40, 10, 512)
    assert layout.model_version == assets.sha256_of(assets.resolve("tddfa/mb05_120x120.pth"))[:12]
    # how faces were found and landmarked is part of the layout
    assert layout.detector == extractor.detector.version and layout.detector.startswith("hog:dlib-")
    assert layout.landmark_source == "tddfa-2pass"


# tddfa's landmark_error is how far the second pass moved the 68 points from the first pass's
# (per inter-ocular distance). On Yale with dlib's boxes: mean 0.023, max 0.048 (measured); the
# bounds below leave 3x margin.
MAX_MEAN_PASS_ERROR = 0.07
MAX_PASS_ERROR = 0.15


@pytest.mark.slow  # every Yale photo
def test_yale_faces_ok_rate_and_landmark_error(extractor, yale_dir):
    """Real data: >= 95% ok and a small, settled pass-to-pass landmark movement."""
    paths = sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject"))
    images = [decode_image(p.read_bytes()) for p in paths]
    t0 = time.perf_counter()
    results = extractor.extract(images)
    seconds = time.perf_counter() - t0
    assert len(results) == len(images)
    ok = [r for r in results if r.status == STATUS_OK]
    errors = np.array([r.landmark_error for r in ok])
    print(f"\ntddfa on Yale: {len(ok)}/{len(results)} ok, mean pass-to-pass landmark error {errors.mean():.4f} "
          f"(median {np.median(errors):.4f}, max {errors.max():.4f}), {seconds:.1f} s")
    assert len(ok) / len(results) >= 0.95
    assert np.isfinite(errors).all() and (errors >= 0).all()
    assert errors.mean() <= MAX_MEAN_PASS_ERROR and errors.max() <= MAX_PASS_ERROR
    for x in ok:
        assert x.landmarks.shape == x.landmarks_fit.shape == (68, 2)
        # landmark_error is the distance between the two passes' points (which do differ)
        assert x.landmark_error == pytest.approx(landmark_error(x.landmarks_fit, x.landmarks), rel=1e-5)
        assert not np.array_equal(x.landmarks, x.landmarks_fit)
    r = ok[0]
    assert r.id_coeffs.shape == (40,) and r.exp_coeffs.shape == (10,) and r.feature.shape == (512,)
    assert r.box.shape == (4,) and r.translation.shape == (3,) and r.width == 320 and r.height == 243
    # Yale is near-frontal: small angles
    yaws = np.array([abs(x.yaw) for x in ok])
    assert np.median(yaws) < 15 and all(abs(x.roll) < 30 for x in ok)
    # rows fit the shared schema
    table = rows_to_table([{"path": str(p), **res.to_row(), "backend": "tddfa"} for p, res in zip(paths, results)],
                          extractor.layout)
    assert table.num_rows == len(paths)


# 3DDFA_V2's 68 points against dlib's predictor on the same FaceBoxes box, over the inter-ocular
# distance. The two disagree mostly on the jaw (the model's contour vertices vs the silhouette).
MAX_MEAN_DISTANCE_TO_DLIB = 0.06


@pytest.mark.slow  # every Yale photo, two detectors
def test_yale_with_faceboxes_finds_every_face_and_agrees_with_dlibs_landmarks(yale_dir):
    """The default flow, no dlib in it: FaceBoxes box -> crop -> regress -> landmarks -> crop ->
    regress. A face in each of the 164 images; tddfa's landmarks near dlib's predictor's."""
    from facedist.extractors.base import interocular_distance
    from facedist.landmarks import DlibShapePredictor

    paths = sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject"))
    images = [decode_image(p.read_bytes()) for p in paths]
    extractor = make_extractor("tddfa")
    assert extractor.detector.name == "faceboxes" and extractor.layout.detector.startswith("FaceBoxesProd:")
    results = []
    for start in range(0, len(images), 64):  # the pipeline's batch size: one detector call each
        results += extractor.extract(images[start:start + 64])
    assert sum(r.num_faces >= 1 for r in results) == len(images) == 164
    ok = [(image, r) for image, r in zip(images, results) if r.ok]
    assert len(ok) >= 0.99 * len(images)
    dlib_points = DlibShapePredictor().predict_batch([im for im, _ in ok], [r.box for _, r in ok])
    distance = np.array([np.linalg.norm(r.landmarks_fit - p, axis=1).mean() / interocular_distance(p)
                         for (_, r), p in zip(ok, dlib_points)])
    print(f"\nFaceBoxes + tddfa on Yale: faces in {sum(r.num_faces >= 1 for r in results)}/164, ok {len(ok)}; "
          f"68 landmarks vs dlib's predictor on the same box: mean {distance.mean():.4f} "
          f"(median {np.median(distance):.4f}) of the inter-ocular distance")
    assert distance.mean() <= MAX_MEAN_DISTANCE_TO_DLIB
    # the comparison is not vacuous: against another face's points the distance is large
    shuffled = np.array([np.linalg.norm(r.landmarks_fit - p, axis=1).mean() / interocular_distance(p)
                         for (_, r), p in zip(ok, dlib_points[1:] + dlib_points[:1])])
    assert shuffled.mean() > 3 * distance.mean()


class _ScriptedDetector:
    """A FaceDetector whose answer for an image is chosen by a marker pixel (0, 0): edge cases a
    real detector rarely produces on demand. An image whose answer is an exception raises it, for
    a whole batch that holds it and for that image alone."""

    name = "scripted"
    version = "scripted-1"

    def __init__(self, answers: dict):
        self.answers = answers  # marker value -> list of FaceBox, or an exception
        self.calls: list[int] = []  # batch size of each call

    def detect_batch(self, images):
        self.calls.append(len(images))
        answers = [self.answers[int(image[0, 0, 0])] for image in images]
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers


def test_degenerate_box_and_detector_crash_become_row_errors(yale_dir):
    from facedist.detection import make_face_detector

    image = decode_image((yale_dir / "subject03.normal").read_bytes())
    real = make_face_detector("dlib").detect_batch([image])[0]
    assert len(real) == 1
    marked = []
    for marker in (1, 2, 3):
        copy = image.copy()
        copy[0, 0] = marker
        marked.append(copy)
    tiny = FaceBox(np.float32([10, 10, 12, 12]), 1.0)
    detector = _ScriptedDetector({1: [tiny], 2: RuntimeError("boom"), 3: real})
    ex = make_extractor("tddfa", detector=detector)
    assert ex.detector is detector and ex.layout.detector == "scripted-1"
    results = ex.extract(marked)
    assert detector.calls[0] == 3  # the whole batch in one call first
    assert results[0].status == STATUS_ERROR and "too small" in results[0].message
    assert results[0].num_faces == 1 and (results[0].width, results[0].height) == (320, 243)
    assert results[1].status == STATUS_ERROR
    assert "face detection failed: RuntimeError: boom" in results[1].message
    assert (results[1].width, results[1].height) == (320, 243)
    assert results[2].status == STATUS_OK, results[2].message
    np.testing.assert_array_equal(results[2].box, real[0].box)
    assert results[2].det_score == pytest.approx(real[0].score)
    assert 0 <= results[2].landmark_error < MAX_PASS_ERROR
    assert results[2].landmarks.shape == results[2].landmarks_fit.shape == (68, 2)


def test_in_plane_rotation_shows_up_as_roll_in_both_backends(extractor, yale_dir):
    """Rotating the photo 20 degrees counter-clockwise adds +20 degrees of roll, for the network
    (through the crop and pixel camera) and for the landmark fit alike: one pose convention."""
    image = decode_image((yale_dir / "subject02.normal").read_bytes())
    h, w = image.shape[:2]
    rotated = cv2.warpAffine(image, cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0), (w, h))
    for ex in (extractor, make_extractor("fit", detector="dlib")):
        before, after = ex.extract([image, rotated])
        assert before.ok and after.ok, (before.message, after.message)
        assert after.roll - before.roll == pytest.approx(20, abs=4), ex.name
        assert abs(after.yaw - before.yaw) < 5 and abs(after.pitch - before.pitch) < 5, ex.name


@pytest.mark.slow  # Yale photos twice
def test_detection_threads_give_the_same_rows(extractor, yale_dir):
    """A batch detected on 2 threads: the same statuses and coefficients, in input order."""
    names = sorted(p.name for p in yale_dir.iterdir() if p.name.startswith("subject1"))[:10]
    images = [decode_image((yale_dir / n).read_bytes()) for n in names]
    images.insert(3, np.zeros((90, 90, 3), np.uint8))  # no face, mid-batch
    threaded = make_extractor("tddfa", detector="dlib", detect_threads=2)
    assert threaded.detector.threads == 2
    got, want = threaded.extract(images), extractor.extract(images)
    assert [r.status for r in got] == [r.status for r in want] and got[3].status == STATUS_NO_FACE
    for a, b in zip(got, want):
        if a.ok:
            np.testing.assert_allclose(a.id_coeffs, b.id_coeffs, rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(a.landmarks, b.landmarks)
