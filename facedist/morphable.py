"""A linear 3D morphable face model (identity + expression), landmark slices and a scaled-orthographic camera.

Two bases load into the same class:
  * 3DDFA's BFM-derived basis (tddfa/bfm/*.npy: 40 identity, 10 expression) - the basis 3DDFA_V2's
    regressor predicts in;
  * Deep3DFaceRecon's BFM_model_front.mat (80 identity, 64 expression, 80 texture).

Both store a face as one 3N vector with x, y, z interleaved per vertex, so vertex v is
``vec[3v:3v+3]`` (3DDFA_V2 writes this as ``vec.reshape(3, -1, order='F')``).

Camera convention (shared by every backend so pose columns are comparable): model frame x right,
y up, z towards the viewer; a Pose maps a model point X to pixels as
    u = scale * (R X)_x + t_x,   v = t_y - scale * (R X)_y,   depth = scale * (R X)_z + t_z
(image rows grow downwards, hence the minus). Euler angles follow 3DDFA_V2's ``matrix2angle``:
R = Rz(roll) @ Ry(-yaw) @ Rx(pitch), reported in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facedist import assets
from facedist.schema import NUM_LANDMARKS

TDDFA_BFM_FILES = ("u_shp", "u_exp", "w_shp_sim", "w_exp_sim", "keypoints_sim")


# --------------------------------------------------------------------------- rotations and pose


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def angles_to_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix from degrees; the exact inverse of rotation_to_angles (away from |yaw|=90)."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    return _rz(r) @ _ry(-y) @ _rx(p)


def rotation_to_angles(R: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees, as 3DDFA_V2's matrix2angle computes them."""
    R = np.asarray(R, dtype=np.float64)
    if R[2, 0] > 0.998:  # gimbal lock: yaw = +90
        yaw, roll = np.pi / 2, 0.0
        pitch = roll + np.arctan2(-R[0, 1], -R[0, 2])
    elif R[2, 0] < -0.998:
        yaw, roll = -np.pi / 2, 0.0
        pitch = -roll + np.arctan2(R[0, 1], R[0, 2])
    else:
        yaw = np.arcsin(R[2, 0])
        c = np.cos(yaw)
        pitch = np.arctan2(R[2, 1] / c, R[2, 2] / c)
        roll = np.arctan2(R[1, 0] / c, R[0, 0] / c)
    return float(np.rad2deg(yaw)), float(np.rad2deg(pitch)), float(np.rad2deg(roll))


def affine_to_scaled_rotation(M: np.ndarray) -> tuple[float, np.ndarray]:
    """Split the 2x3 (or 3x3) linear part of an affine camera into scale and a rotation
    (3DDFA_V2's P2sRt: mean row norm, rows normalised, third row their cross product).
    The two unit rows are then replaced by their nearest orthonormal pair (polar decomposition),
    so R is a true rotation even when the regressor's rows are slightly skewed."""
    r1, r2 = np.asarray(M[0], np.float64), np.asarray(M[1], np.float64)
    scale = (np.linalg.norm(r1) + np.linalg.norm(r2)) / 2.0
    rows = np.stack([r1 / np.linalg.norm(r1), r2 / np.linalg.norm(r2)])
    U, _, Vt = np.linalg.svd(rows, full_matrices=False)
    a, b = U @ Vt
    return float(scale), np.stack([a, b, np.cross(a, b)])


@dataclass
class Pose:
    """Scaled-orthographic camera into pixel coordinates (see the module docstring)."""

    rotation: np.ndarray                      # (3, 3) orthonormal
    scale: float                              # pixels per model unit
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))  # (2,) or (3,) pixels

    @classmethod
    def from_angles(cls, yaw: float, pitch: float, roll: float, scale: float,
                    translation=(0.0, 0.0, 0.0)) -> "Pose":
        return cls(angles_to_rotation(yaw, pitch, roll), float(scale), np.asarray(translation, np.float64))

    @property
    def angles(self) -> tuple[float, float, float]:
        """(yaw, pitch, roll) in degrees."""
        return rotation_to_angles(self.rotation)

    def affine(self) -> np.ndarray:
        """The same camera as a 3x4 matrix: pixels (u, v, depth) = A @ [X; 1]."""
        A = np.empty((3, 4))
        A[:, :3] = _IMAGE_FLIP @ (self.scale * self.rotation)
        A[:, 3] = self.translation3
        return A

    @property
    def translation3(self) -> np.ndarray:
        t = np.zeros(3)
        tt = np.asarray(self.translation, np.float64).ravel()
        t[: tt.size] = tt
        return t


# Pixel frame flips y (rows grow downwards); z stays towards the viewer.
_IMAGE_FLIP = np.diag([1.0, -1.0, 1.0])


def apply_affine(points3d: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Points (N, 3) through a 3x4 camera: (N, 3) pixels u, v, depth."""
    return (np.asarray(points3d, np.float64) @ A[:, :3].T + A[:, 3]).astype(np.float32)


def project(points3d: np.ndarray, pose: Pose) -> np.ndarray:
    """Model-frame points (N, 3) to pixels: (N, 3) columns u, v, depth (larger = nearer)."""
    pts = np.asarray(points3d, np.float64) @ (pose.scale * pose.rotation).T
    return (pts @ _IMAGE_FLIP + pose.translation3).astype(np.float32)


# --------------------------------------------------------------------------- the model


class MorphableModel:
    """mean + id_basis @ id_coeffs + exp_basis @ exp_coeffs, per-vertex x,y,z interleaved; float32."""

    def __init__(self, mean: np.ndarray, id_basis: np.ndarray, exp_basis: np.ndarray,
                 keypoints: np.ndarray, *, triangles: np.ndarray | None = None,
                 tex_mean: np.ndarray | None = None, tex_basis: np.ndarray | None = None,
                 name: str = "bfm"):
        self.mean = np.ascontiguousarray(mean, np.float32).ravel()
        self.id_basis = np.ascontiguousarray(id_basis, np.float32)
        self.exp_basis = np.ascontiguousarray(exp_basis, np.float32)
        n3 = self.mean.size
        if n3 % 3 or self.id_basis.shape[0] != n3 or self.exp_basis.shape[0] != n3:
            raise ValueError(f"basis rows {self.id_basis.shape[0]}/{self.exp_basis.shape[0]} "
                             f"do not match the mean's {n3} (3 x vertices)")
        self.keypoints = np.asarray(keypoints, np.int64).ravel()  # vertex indices of the 68 landmarks
        if self.keypoints.size != NUM_LANDMARKS or self.keypoints.max() >= n3 // 3:
            raise ValueError(f"need {NUM_LANDMARKS} landmark vertex indices below {n3 // 3}")
        self.triangles = None if triangles is None else np.asarray(triangles, np.int64)
        self.tex_mean = None if tex_mean is None else np.asarray(tex_mean, np.float32).ravel()
        self.tex_basis = None if tex_basis is None else np.asarray(tex_basis, np.float32)
        self.name = name
        # Landmark-only slices: 204 rows instead of 3N, so fitting and reprojection stay cheap.
        rows = (3 * self.keypoints[:, None] + np.arange(3)).ravel()
        self.lm_mean = self.mean[rows]
        self.lm_id_basis = self.id_basis[rows]
        self.lm_exp_basis = self.exp_basis[rows]

    # ---- loaders

    @classmethod
    def from_tddfa(cls) -> "MorphableModel":
        """3DDFA's basis from the model directory (facedist.assets): 40 identity, 10 expression."""
        arrays = {n: np.load(assets.resolve(f"tddfa/bfm/{n}.npy")) for n in TDDFA_BFM_FILES}
        kp = arrays["keypoints_sim"].ravel()
        if not (np.all(kp[0::3] % 3 == 0) and np.all(kp[1::3] == kp[0::3] + 1)):
            raise ValueError("keypoints_sim is not x,y,z-consecutive indices into the 3N vector")
        # 3DDFA's mean face is the identity mean plus the expression mean (u = u_shp + u_exp).
        mean = arrays["u_shp"].ravel() + arrays["u_exp"].ravel()
        return cls(mean, arrays["w_shp_sim"], arrays["w_exp_sim"], kp[0::3] // 3, name="tddfa_bfm")

    @classmethod
    def from_deep3d_mat(cls, path: str | Path | None = None, *, recenter: bool = True) -> "MorphableModel":
        """Deep3DFaceRecon's BFM_model_front.mat (meanshape 1x3N, idBase 3Nx80, exBase 3Nx64,
        meantex, texBase, tri and keypoints 1-based). recenter subtracts the mean vertex, as
        Deep3DFaceRecon's ParametricFaceModel does by default."""
        from scipy.io import loadmat

        path = Path(path) if path is not None else assets.resolve("deep3d/BFM_model_front.mat")
        m = loadmat(str(path))
        missing = [k for k in ("meanshape", "idBase", "exBase", "keypoints") if k not in m]
        if missing:
            raise ValueError(f"{path}: not a BFM_model_front.mat layout, missing {missing}")
        mean = np.asarray(m["meanshape"], np.float32).ravel()
        if recenter:
            mean = (mean.reshape(-1, 3) - mean.reshape(-1, 3).mean(0, keepdims=True)).ravel()
        tri = np.asarray(m["tri"], np.int64) - 1 if "tri" in m else None
        return cls(mean, m["idBase"], m["exBase"], np.asarray(m["keypoints"]).ravel().astype(np.int64) - 1,
                   triangles=tri, tex_mean=m.get("meantex"), tex_basis=m.get("texBase"), name="deep3d_bfm")

    # ---- geometry

    @property
    def n_vertices(self) -> int:
        return self.mean.size // 3

    @property
    def n_id(self) -> int:
        return self.id_basis.shape[1]

    @property
    def n_exp(self) -> int:
        return self.exp_basis.shape[1]

    def _coeffs(self, id_coeffs, exp_coeffs) -> tuple[np.ndarray, np.ndarray]:
        id_coeffs = np.zeros(self.n_id, np.float32) if id_coeffs is None else np.asarray(id_coeffs, np.float32).ravel()
        exp_coeffs = np.zeros(self.n_exp, np.float32) if exp_coeffs is None else np.asarray(exp_coeffs, np.float32).ravel()
        if id_coeffs.size != self.n_id or exp_coeffs.size != self.n_exp:
            raise ValueError(f"expected {self.n_id} id / {self.n_exp} exp coefficients, "
                             f"got {id_coeffs.size} / {exp_coeffs.size}")
        return id_coeffs, exp_coeffs

    def vertices(self, id_coeffs=None, exp_coeffs=None) -> np.ndarray:
        """(N, 3) model-frame vertices."""
        id_coeffs, exp_coeffs = self._coeffs(id_coeffs, exp_coeffs)
        return (self.mean + self.id_basis @ id_coeffs + self.exp_basis @ exp_coeffs).reshape(-1, 3)

    def landmarks(self, id_coeffs=None, exp_coeffs=None) -> np.ndarray:
        """(68, 3) model-frame landmarks, from the sliced bases only."""
        id_coeffs, exp_coeffs = self._coeffs(id_coeffs, exp_coeffs)
        return (self.lm_mean + self.lm_id_basis @ id_coeffs + self.lm_exp_basis @ exp_coeffs).reshape(-1, 3)

    def project(self, points3d: np.ndarray, pose: Pose) -> np.ndarray:
        return project(points3d, pose)
