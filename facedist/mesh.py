"""A light wireframe of the fitted face for overlays (the web page, API responses).

3DDFA's basis has no triangles and 53k vertices, far more than a browser overlay needs. So a
decimated topology is built once per model: about n_points vertices picked on a regular grid
over the mean face seen from the front, triangulated in that frontal x,y plane (Delaunay), with
triangles that bridge gaps in the surface (long edges) dropped. Projecting a fitted face then
evaluates only the picked vertices: mean[idx] + basis[idx] @ coeffs, through the pixel camera.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from facedist.morphable import MorphableModel, apply_affine

DEFAULT_POINTS = 1200
# A triangle is kept when its longest edge is at most this many grid cells (the grid diagonal is
# ~1.4 cells; longer edges span holes such as the mouth or the concave outline).
MAX_EDGE_CELLS = 2.5


def _pick_cells(xy: np.ndarray, cell: float) -> np.ndarray:
    """One point per occupied grid cell of side `cell`: the one nearest the cell centre."""
    grid = (xy - xy.min(0)) / cell
    ij = np.floor(grid).astype(np.int64)
    key = ij[:, 0] * (int(ij[:, 1].max()) + 1) + ij[:, 1]
    dist = np.sum((grid - ij - 0.5) ** 2, axis=1)
    order = np.lexsort((dist, key))  # by cell, nearest the centre first
    first = np.ones(len(order), bool)
    first[1:] = key[order][1:] != key[order][:-1]
    return np.sort(order[first])


def _grid_pick(xy: np.ndarray, n_points: int) -> tuple[np.ndarray, float]:
    """About n_points indices spread evenly over xy; returns (indices, grid cell size)."""
    # Start from the bounding box's cell size, then correct for the face not filling its box
    # (and for partly covered border cells): the count scales with 1 / cell^2.
    cell = float(np.sqrt(np.prod(np.ptp(xy, 0)) / max(n_points, 1)))
    for _ in range(4):
        picked = _pick_cells(xy, cell)
        if abs(len(picked) - n_points) <= 0.05 * n_points:
            break
        cell *= float(np.sqrt(len(picked) / n_points))
    return picked, cell


@lru_cache(maxsize=4)
def decimated_mesh(model: MorphableModel, n_points: int = DEFAULT_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(vertex indices (K,), triangles (T, 3) indexing into those K) for a model; cached."""
    from scipy.spatial import Delaunay

    xy = model.mean.reshape(-1, 3)[:, :2].astype(np.float64)
    indices, cell = _grid_pick(xy, n_points)
    points = xy[indices]
    triangles = Delaunay(points).simplices
    corners = points[triangles]  # (T, 3, 2)
    edges = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2)
    keep = edges.max(axis=1) <= MAX_EDGE_CELLS * cell
    return indices.astype(np.int64), triangles[keep].astype(np.int64)


def project_mesh(model: MorphableModel, id_coeffs, exp_coeffs, camera, n_points: int = DEFAULT_POINTS) -> np.ndarray:
    """Pixel (x, y) of the decimated mesh's vertices for coefficients and a 3x4 pixel camera: (K, 2)."""
    indices, _ = decimated_mesh(model, n_points)
    id_coeffs, exp_coeffs = model._coeffs(id_coeffs, exp_coeffs)
    rows = (3 * indices[:, None] + np.arange(3)).ravel()
    points = model.mean[rows] + model.id_basis[rows] @ id_coeffs + model.exp_basis[rows] @ exp_coeffs
    return apply_affine(points.reshape(-1, 3), np.asarray(camera, np.float64))[:, :2]


def result_mesh2d(result, model: MorphableModel | None, n_points: int = DEFAULT_POINTS) -> np.ndarray | None:
    """The decimated mesh in pixels for an ExtractionResult, or None where its camera or basis is
    unknown (deep3d, failed rows) or the result was fitted in another model's basis."""
    extras = getattr(result, "extras", None) or {}
    camera = extras.get("camera")
    if (model is None or result is None or not result.ok or camera is None
            or extras.get("basis") != model.name or result.id_coeffs is None or result.exp_coeffs is None):
        return None
    return project_mesh(model, result.id_coeffs, result.exp_coeffs, camera, n_points)
