"""Overlays for eyeballing an extraction: the mesh, detected and reprojected landmarks on the image.

Colours: mesh = light blue points (or a wireframe when the basis has triangles), detected
landmarks = green, landmarks reprojected from the coefficients = red, face box = yellow.

The mesh comes from result.extras["vertices"] (pixels) when an extractor put it there; otherwise it
is rebuilt from the coefficients and extras["camera"] (a 3x4 pixel camera) for 3DDFA's basis
(extras["basis"] == "tddfa_bfm"), with the basis loaded once per process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from facedist.extractors.base import ExtractionResult

MESH_POINTS = 60000  # point-cloud budget: all of 3DDFA's 53k vertices
COLOUR_MESH = (120, 190, 255)
COLOUR_DETECTED = (0, 220, 0)
COLOUR_FIT = (255, 40, 40)
COLOUR_BOX = (255, 220, 0)


@lru_cache(maxsize=1)
def _tddfa_model():
    from facedist.morphable import MorphableModel

    return MorphableModel.from_tddfa()


def mesh_vertices(result: ExtractionResult) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(vertices in pixels (N, 3) or None, triangles (T, 3) or None) for a result."""
    extras = result.extras or {}
    if extras.get("vertices") is not None:
        return np.asarray(extras["vertices"], np.float32), extras.get("triangles")
    camera = extras.get("camera")
    if (camera is not None and extras.get("basis") == "tddfa_bfm"
            and result.id_coeffs is not None and result.exp_coeffs is not None):
        from facedist.morphable import apply_affine

        model = _tddfa_model()
        return apply_affine(model.vertices(result.id_coeffs, result.exp_coeffs), np.asarray(camera)), model.triangles
    return None, None


def _points(canvas: np.ndarray, points: np.ndarray, colour, radius: int) -> None:
    for x, y in np.round(points[:, :2]).astype(int):
        cv2.circle(canvas, (int(x), int(y)), radius, colour, -1, lineType=cv2.LINE_AA)


def draw_preview(image_rgb: np.ndarray, result: ExtractionResult) -> np.ndarray:
    """RGB uint8 copy of the image with the mesh, both landmark sets and the box drawn over it."""
    image = np.asarray(image_rgb)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    canvas = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8).copy()
    h, w = canvas.shape[:2]
    radius = max(1, round(max(h, w) / 300))

    vertices, triangles = mesh_vertices(result)
    if vertices is not None and len(vertices):
        mesh = canvas.copy()
        if triangles is not None and len(triangles):
            step = max(1, len(triangles) // (2 * MESH_POINTS))
            tris = np.round(vertices[np.asarray(triangles)[::step], :2]).astype(np.int32)
            cv2.polylines(mesh, list(tris), True, COLOUR_MESH, 1, lineType=cv2.LINE_AA)
        else:
            # A dense point cloud shaded by depth (nearer = brighter) shows the fitted surface;
            # far-to-near drawing makes the front-most point win where the surface folds.
            pts = vertices[:: max(1, len(vertices) // MESH_POINTS)]
            pts = pts[np.argsort(pts[:, 2])]
            xy = np.round(pts[:, :2]).astype(int)
            inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
            depth = pts[inside, 2]
            shade = 0.45 + 0.55 * (depth - depth.min()) / max(float(np.ptp(depth)), 1e-6) if depth.size else depth
            mesh[xy[inside, 1], xy[inside, 0]] = (shade[:, None] * np.float32(COLOUR_MESH)).astype(np.uint8)
        canvas = cv2.addWeighted(mesh, 0.55, canvas, 0.45, 0)  # the face stays visible under it

    if result.box is not None:
        x0, y0, x1, y1 = np.round(np.asarray(result.box, np.float64)).astype(int)
        cv2.rectangle(canvas, (int(x0), int(y0)), (int(x1), int(y1)), COLOUR_BOX, 1)
    if result.landmarks is not None:
        _points(canvas, np.asarray(result.landmarks), COLOUR_DETECTED, radius)
    if result.landmarks_fit is not None:
        _points(canvas, np.asarray(result.landmarks_fit), COLOUR_FIT, radius)
    return canvas


def render_preview_png(image_rgb: np.ndarray, result: ExtractionResult) -> bytes:
    """The preview as PNG bytes (for object stores)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(draw_preview(image_rgb, result), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def save_preview(path: str | Path, image_rgb: np.ndarray, result: ExtractionResult) -> Path:
    """Write the preview to a local PNG file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render_preview_png(image_rgb, result))
    return path
