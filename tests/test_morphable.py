"""MorphableModel: the real 3DDFA basis, rotations/pose, and the Deep3DFaceRecon .mat loader."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import savemat

from facedist.morphable import (MorphableModel, Pose, affine_to_scaled_rotation, angles_to_rotation,
                                apply_affine, project, rotation_to_angles)


@pytest.fixture(scope="module")
def bfm() -> MorphableModel:
    return MorphableModel.from_tddfa()


def test_tddfa_basis_layout_and_landmark_slices(bfm):
    assert (bfm.n_vertices, bfm.n_id, bfm.n_exp) == (53215, 40, 10)
    assert bfm.id_basis.dtype == np.float32 and bfm.exp_basis.dtype == np.float32
    rng = np.random.default_rng(0)
    shape, exp = rng.normal(0, 2e5, 40), rng.normal(0, 1.0, 10)
    dense = bfm.vertices(shape, exp)
    # The sliced landmark bases give exactly the dense mesh's landmark vertices.
    np.testing.assert_allclose(bfm.landmarks(shape, exp), dense[bfm.keypoints], rtol=1e-5, atol=1.0)
    lm = bfm.landmarks()
    # Model frame: y up (eyes above the mouth), z towards the viewer (nose tip in front), x right.
    assert lm[37, 1] > lm[62, 1] and lm[30, 2] > lm[36, 2] and lm[45, 0] > lm[36, 0]
    with pytest.raises(ValueError):
        bfm.vertices(np.zeros(39), None)


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (30, -10, 5), (-60, 25, -40), (10, 80, 170)])
def test_angles_round_trip(yaw, pitch, roll):
    R = angles_to_rotation(yaw, pitch, roll)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(rotation_to_angles(R), (yaw, pitch, roll), atol=1e-9)


def test_pure_yaw_is_a_rotation_about_the_vertical_axis():
    R = angles_to_rotation(90 - 1e-6, 0, 0)
    # The y axis stays put; x and z swap (a head turned fully sideways).
    np.testing.assert_allclose(R @ [0, 1, 0], [0, 1, 0], atol=1e-9)
    assert abs(R[2, 0]) == pytest.approx(1.0, abs=1e-6)
    assert rotation_to_angles(angles_to_rotation(90, 0, 0))[0] == pytest.approx(90)


def test_project_scaled_orthographic_into_pixels():
    pose = Pose.from_angles(0, 0, 0, scale=2.0, translation=(100, 50))
    pts = project(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float), pose)
    # x right, y up in the model -> rows grow downwards in pixels; depth grows towards the viewer
    np.testing.assert_allclose(pts, [[100, 50, 0], [102, 50, 0], [100, 48, 0], [100, 50, 2]])
    pose = Pose.from_angles(20, -5, 12, scale=0.7, translation=(3, 4, 5))
    X = np.random.default_rng(1).normal(size=(10, 3))
    np.testing.assert_allclose(apply_affine(X, pose.affine()), project(X, pose), atol=1e-5)


def test_affine_to_scaled_rotation_recovers_scale_and_rotation():
    R = angles_to_rotation(15, 25, -35)
    s, R2 = affine_to_scaled_rotation(3.5 * R[:2])
    assert s == pytest.approx(3.5)
    np.testing.assert_allclose(R2, R, atol=1e-12)
    # slightly non-orthogonal rows (what a regressor outputs) still give a proper rotation
    noisy = 3.5 * R[:2] + np.random.default_rng(0).normal(0, 0.02, (2, 3))
    _, R3 = affine_to_scaled_rotation(noisy)
    np.testing.assert_allclose(R3 @ R3.T, np.eye(3), atol=1e-12)
    assert np.abs(np.array(rotation_to_angles(R3)) - (15, 25, -35)).max() < 1.5


def test_deep3d_mat_layout(tmp_path):
    """A small file in BFM_model_front.mat's layout: 1-based keypoints/triangles, interleaved xyz."""
    rng = np.random.default_rng(3)
    n = 120
    meanshape = rng.normal(0, 50, (1, 3 * n)).astype(np.float32) + np.tile([10, 20, 30], n)
    id_base = rng.normal(size=(3 * n, 80)).astype(np.float32)
    ex_base = rng.normal(size=(3 * n, 64)).astype(np.float32)
    tri = rng.integers(1, n + 1, size=(200, 3)).astype(np.float64)
    keypoints = (np.arange(68) + 1 + 40).astype(np.float64)[None]  # vertices 40..107, 1-based
    path = tmp_path / "BFM_model_front.mat"
    savemat(str(path), {"meanshape": meanshape, "idBase": id_base, "exBase": ex_base,
                        "meantex": rng.uniform(0, 255, (1, 3 * n)).astype(np.float32),
                        "texBase": rng.normal(size=(3 * n, 80)).astype(np.float32),
                        "tri": tri, "keypoints": keypoints,
                        "point_buf": rng.integers(1, 200, size=(n, 8)).astype(np.float64)})
    model = MorphableModel.from_deep3d_mat(path)
    assert (model.n_vertices, model.n_id, model.n_exp) == (n, 80, 64)
    assert model.tex_basis.shape == (3 * n, 80)
    np.testing.assert_array_equal(model.keypoints, np.arange(68) + 40)
    np.testing.assert_array_equal(model.triangles, tri.astype(np.int64) - 1)
    id_coeffs, exp_coeffs = rng.normal(size=80), rng.normal(size=64)
    centred = meanshape.reshape(-1, 3) - meanshape.reshape(-1, 3).mean(0)
    expected = centred + (id_base @ id_coeffs + ex_base @ exp_coeffs).reshape(-1, 3)
    np.testing.assert_allclose(model.vertices(id_coeffs, exp_coeffs), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(model.landmarks(id_coeffs, exp_coeffs), expected[40:108], rtol=1e-4, atol=1e-3)
    raw = MorphableModel.from_deep3d_mat(path, recenter=False)
    np.testing.assert_allclose(raw.vertices(), meanshape.reshape(-1, 3), rtol=1e-6)
    savemat(str(tmp_path / "bad.mat"), {"meanshape": meanshape})
    with pytest.raises(ValueError, match="missing"):
        MorphableModel.from_deep3d_mat(tmp_path / "bad.mat")
