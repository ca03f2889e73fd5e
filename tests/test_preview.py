"""Previews: mesh + detected (green) + reprojected (red) landmarks drawn where they belong."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facedist.extractors import make_extractor
from facedist.extractors.base import ExtractionResult
from facedist.images import decode_image
from facedist.morphable import MorphableModel, Pose
from facedist.preview import COLOUR_DETECTED, COLOUR_FIT, draw_preview, mesh_vertices, render_preview_png, save_preview


@pytest.fixture(scope="module")
def synthetic():
    """A result built from known coefficients and pose on a grey image (no detector involved)."""
    model = MorphableModel.from_tddfa()
    pose = Pose.from_angles(15, -5, 3, scale=0.0012, translation=(160, 130, 0))
    shape, exp = np.zeros(40, np.float32), np.zeros(10, np.float32)
    fit = model.project(model.landmarks(shape, exp), pose)[:, :2]
    detected = fit + np.float32([6, 0])  # detected points a few pixels to the right
    result = ExtractionResult(width=320, height=260, num_faces=1, box=np.float32([90, 60, 230, 220]),
                              landmarks=detected, landmarks_fit=fit, id_coeffs=shape, exp_coeffs=exp,
                              extras={"basis": "tddfa_bfm", "camera": pose.affine()})
    return np.full((260, 320, 3), 60, np.uint8), result, model, pose


def test_mesh_is_rebuilt_from_coefficients_and_camera(synthetic):
    image, result, model, pose = synthetic
    vertices, _ = mesh_vertices(result)
    np.testing.assert_allclose(vertices, model.project(model.vertices(), pose), atol=1e-3)
    # no camera, no vertices: no mesh (landmarks only), and that is not an error
    assert mesh_vertices(ExtractionResult(landmarks=result.landmarks))[0] is None


def test_draw_preview_marks_landmarks_and_mesh(synthetic):
    image, result, _, _ = synthetic
    out = draw_preview(image, result)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, np.full_like(image, 60))  # input untouched
    x, y = np.round(result.landmarks_fit[30]).astype(int)
    assert tuple(out[y, x]) == COLOUR_FIT
    x, y = np.round(result.landmarks[0]).astype(int)  # jaw point, clear of the red ones
    assert tuple(out[y, x]) == COLOUR_DETECTED
    changed = np.any(out != image, axis=2)
    x0, y0, x1, y1 = result.box.astype(int)
    inside = changed[y0 + 5:y1 - 5, x0 + 5:x1 - 5].mean()
    outside = np.concatenate([changed[:, :60].ravel(), changed[:, 270:].ravel()]).mean()
    assert inside > 0.3 and outside < 0.01  # the mesh covers the face and nothing else


def test_previews_written_for_real_extractions(yale_dir, tmp_path):
    image = decode_image((yale_dir / "subject02.happy").read_bytes())
    for backend in ("tddfa", "fit"):
        result = make_extractor(backend).extract([image])[0]
        assert result.ok, result.message
        path = save_preview(tmp_path / backend / "subject02.happy.png", image, result)
        back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert back.shape == image.shape
        np.testing.assert_array_equal(back, draw_preview(image, result))
        # the mesh was drawn over the face: most pixels inside the face box changed
        x0, y0, x1, y1 = result.box.astype(int)
        assert np.any(back != image, axis=2)[y0:y1, x0:x1].mean() > 0.3
        png = render_preview_png(image, result)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_vertices_from_the_extractor_match_the_rebuilt_mesh(yale_dir):
    image = decode_image((yale_dir / "subject05.sad").read_bytes())
    result = make_extractor("tddfa", with_vertices=True).extract([image])[0]
    assert result.ok
    given = result.extras.pop("vertices")
    rebuilt, _ = mesh_vertices(result)  # from coefficients + camera
    np.testing.assert_allclose(rebuilt, given, atol=1e-2)
    # the landmark vertices of the mesh are the reprojected landmarks
    model = MorphableModel.from_tddfa()
    np.testing.assert_allclose(given[model.keypoints, :2], result.landmarks_fit, atol=1e-2)


def test_triangle_mesh_is_drawn_as_a_wireframe():
    vertices = np.float32([[20, 20, 0], [80, 20, 0], [50, 80, 0]])
    result = ExtractionResult(extras={"vertices": vertices, "triangles": np.array([[0, 1, 2]])})
    out = draw_preview(np.zeros((100, 100, 3), np.uint8), result)
    lit = np.any(out > 0, axis=2)
    assert lit[20, 50] and lit[50, 35]      # on the edges
    assert not lit[40, 50] and not lit[90, 90]  # inside the triangle and outside it: untouched
