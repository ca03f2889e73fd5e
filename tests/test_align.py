"""Deep3DFaceRecon's 5-point alignment, checked against a case worked out by hand and against
upstream's resize-the-whole-image-then-crop on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from facedist import assets
from facedist.align import (AlignTransform, align_face, estimate_transform, five_points, load_lm3d, pos,
                            resize_and_crop)


@pytest.fixture(scope="module")
def lm68_3d() -> np.ndarray:
    return loadmat(str(assets.resolve("deep3d/similarity_Lm3D_all.mat")))["lm"].astype(np.float64)


def test_five_points_from_68():
    lm = np.zeros((68, 2))
    lm[30] = [50, 60]                   # nose tip
    lm[36], lm[39] = [20, 40], [30, 42]  # left eye corners
    lm[42], lm[45] = [70, 42], [80, 40]  # right eye corners
    lm[48], lm[54] = [35, 80], [65, 80]  # mouth corners
    np.testing.assert_allclose(five_points(lm), [[25, 41], [75, 41], [50, 60], [35, 80], [65, 80]])


def test_load_lm3d_is_the_standard_face(lm68_3d):
    lm3d = load_lm3d()
    assert lm3d.shape == (5, 3)
    np.testing.assert_allclose(lm3d, five_points(lm68_3d))
    left_eye, right_eye, nose, left_mouth, right_mouth = lm3d
    assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert left_mouth[1] < nose[1] < left_eye[1]  # the model frame's y axis points up


def test_pos_recovers_known_scale_and_translation():
    lm3d = load_lm3d()
    angle = np.deg2rad(10.0)  # an in-plane rotation must not change the scale
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0]])
    xp = 51.0 * (rot @ lm3d.T) + np.array([[160.0], [120.0]])
    t, s = pos(xp, lm3d.T)
    np.testing.assert_allclose(t, [160.0, 120.0], atol=1e-9)
    assert s == pytest.approx(51.0, abs=1e-9)


# The hand-computed case: 68 landmarks = the standard face scaled by 51 and moved to (TX, TY) in
# y-up coordinates of a 320 x 240 image, TX = 160 + D / 2 and TY = 120 - D / 2. POS gives
# s_pos = 51, t = (TX, TY), so the image is scaled by 102 / 51 = 2 to 640 x 480, and the window is
#   left = 640/2 - 112 + (TX - 320/2) * 2 = 208 + D,   top = 480/2 - 112 + (240/2 - TY) * 2 = 128 + D,
# truncated to (208, 128). D keeps both a quarter pixel away from an integer: exactly on one,
# float rounding decides the truncation (127.99999 -> 127) and the case fails on some machines.
# A standard point (X, Y) lands at crop x = 102 X + 112 and y-up 102 Y + 112, i.e. row 111 - 102 Y.
W, H, K, D = 320, 240, 51.0, 0.25
TX, TY = 160.0 + D / 2, 120.0 - D / 2


def _hand_case_landmarks(lm68_3d: np.ndarray) -> np.ndarray:
    up = K * lm68_3d[:, :2] + [TX, TY]
    return np.stack([up[:, 0], H - 1 - up[:, 1]], axis=1)  # image rows grow downwards


def test_hand_computed_transform(lm68_3d):
    landmarks = _hand_case_landmarks(lm68_3d)
    tr = estimate_transform(landmarks, W, H, load_lm3d())
    assert tr.scale == pytest.approx(2.0, abs=1e-9)
    assert (tr.tx, tr.ty) == (pytest.approx(TX, abs=1e-7), pytest.approx(TY, abs=1e-7))
    assert tr.resized_size == (640, 480)
    assert tr.window == (208, 128)
    expected = np.stack([102 * lm68_3d[:, 0] + 112, 111 - 102 * lm68_3d[:, 1]], axis=1)
    np.testing.assert_allclose(tr.image_to_crop(landmarks), expected, atol=1e-6)
    np.testing.assert_allclose(tr.crop_to_image(expected), landmarks, atol=1e-6)
    np.testing.assert_allclose(tr.as_array(), [W, H, 2.0, TX, TY], atol=1e-7)


def _blobs(points: np.ndarray, width: int, height: int, sigma: float = 1.2) -> np.ndarray:
    """A dark image with a small bright Gaussian spot centred exactly on each point."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width))
    for x, y in points:
        img = np.maximum(img, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)))
    return np.repeat((img * 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def _centroid(crop: np.ndarray, x: float, y: float, radius: int = 5) -> np.ndarray:
    x0, y0 = int(round(x)) - radius, int(round(y)) - radius
    patch = crop[y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1, 0].astype(np.float64)
    patch = np.clip(patch - 0.2 * patch.max(), 0, None)  # ignore the faint tails of neighbours
    yy, xx = np.mgrid[0:patch.shape[0], 0:patch.shape[1]]
    return np.array([(xx * patch).sum() / patch.sum() + x0, (yy * patch).sum() / patch.sum() + y0])


def test_hand_computed_crop_puts_points_at_expected_pixels(lm68_3d):
    landmarks = _hand_case_landmarks(lm68_3d)
    five = five_points(landmarks)
    image = _blobs(five, W, H)
    aligned = align_face(image, landmarks)
    assert aligned.crop.shape == (224, 224, 3) and aligned.crop.dtype == np.float32
    assert 0.0 <= aligned.crop.min() and aligned.crop.max() <= 1.0
    std5 = load_lm3d()
    expected = np.stack([102 * std5[:, 0] + 112, 111 - 102 * std5[:, 1]], axis=1)
    # PIL samples pixel centres: image point (x, y) lands at crop column 2x + 0.5 - 208 and row
    # 2y + 0.5 - 128, while upstream's landmark formula uses the untruncated window (208 + D,
    # 128 + D) and maps y-up rows with one pixel less: half a pixel, plus D from the truncation.
    for point in expected:
        np.testing.assert_allclose(_centroid(aligned.crop, *point), point + [0.5 + D, -0.5 + D], atol=0.1)
    np.testing.assert_allclose(five_points(aligned.landmarks), expected, atol=1e-6)


def _upstream_resize_n_crop(image: np.ndarray, tr: AlignTransform) -> np.ndarray:
    """util/preprocess.py resize_n_crop_img: resize everything, then crop (black outside)."""
    w, h = tr.resized_size
    left, top = tr.window
    big = Image.fromarray(image).resize((w, h), resample=Image.BICUBIC)
    return np.asarray(big.crop((left, top, left + 224, top + 224)))


@pytest.mark.parametrize("scale,tx,ty", [(2.0, 160, 120), (0.73, 50.3, 200.7), (1.37, 300, 10), (3.1, -20, 100)])
def test_window_resample_matches_upstream(yale_dir, scale, tx, ty):
    image = np.asarray(Image.open(yale_dir / "subject02.normal").convert("RGB"))
    h0, w0 = image.shape[:2]
    tr = AlignTransform(w0, h0, scale, tx, ty)
    got = resize_and_crop(image, tr).astype(int)
    ref = _upstream_resize_n_crop(image, tr).astype(int)
    assert np.abs(got - ref).max() <= 1  # float rounding of the same bicubic taps
    assert (got != ref).mean() < 0.01


def test_degenerate_landmarks_are_rejected():
    image = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(ValueError):
        align_face(image, np.full((68, 2), 50.0))
    with pytest.raises(ValueError):
        align_face(np.zeros((100, 100), np.uint8), np.random.default_rng(0).random((68, 2)) * 100)
