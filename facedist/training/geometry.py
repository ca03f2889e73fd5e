"""A differentiable 68-keypoint slice of the morphable model, and per-image affine cameras.

C-Net's weak supervision compares landmarks predicted from an *aggregated* identity with each
image's detected landmarks, so it needs the basis at the 68 keypoints in torch:
    X(α, β) = u + W_id α + W_exp β          (68, 3), model units
and a camera per image. 3DDFA's camera is affine (scaled rotation rows + translation, z dropped,
then the crop-to-image similarity), so we recover each image's camera in closed form by least
squares from its *own* coefficients to its reprojected landmarks (``landmarks_fit``): it is
convention-free (no Euler-angle conventions to agree on) and exact for an affine projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch




@dataclass
class KeypointBasis:
    """mean (68, 3), w_id (68, 3, n_id), w_exp (68, 3, n_exp), float32 numpy."""

    mean: np.ndarray
    w_id: np.ndarray
    w_exp: np.ndarray

    @property
    def n_id(self) -> int:
        return self.w_id.shape[-1]

    @property
    def n_exp(self) -> int:
        return self.w_exp.shape[-1]

    @classmethod
    def from_morphable(cls, model) -> "KeypointBasis":
        """The 68-keypoint rows of a facedist.morphable.MorphableModel (x, y, z interleaved)."""
        n = model.keypoints.size
        return cls(model.lm_mean.reshape(n, 3).astype(np.float32),
                   model.lm_id_basis.reshape(n, 3, -1).astype(np.float32),
                   model.lm_exp_basis.reshape(n, 3, -1).astype(np.float32))

    @classmethod
    def tddfa(cls) -> "KeypointBasis":
        """3DDFA's BFM basis at the 68 iBUG keypoints (the basis the tddfa backend regresses in)."""
        from facedist.morphable import MorphableModel

        return cls.from_morphable(MorphableModel.from_tddfa())

    def points(self, id_coeffs: np.ndarray, exp_coeffs: np.ndarray) -> np.ndarray:
        """(..., n_id), (..., n_exp) -> (..., 68, 3)."""
        return (self.mean + np.einsum("kcd,...d->...kc", self.w_id, id_coeffs)
                + np.einsum("kcd,...d->...kc", self.w_exp, exp_coeffs)).astype(np.float32)

    def torch(self, device: str | torch.device = "cpu") -> "TorchKeypointBasis":
        return TorchKeypointBasis(self, device)


class TorchKeypointBasis(torch.nn.Module):
    """The same basis as buffers (moves with .to(device), differentiable in id_coeffs / exp_coeffs)."""

    def __init__(self, basis: KeypointBasis, device: str | torch.device = "cpu"):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(basis.mean, device=device))
        self.register_buffer("w_id", torch.as_tensor(basis.w_id, device=device))
        self.register_buffer("w_exp", torch.as_tensor(basis.w_exp, device=device))

    def forward(self, id_coeffs: torch.Tensor, exp_coeffs: torch.Tensor) -> torch.Tensor:
        return (self.mean + torch.einsum("kcd,...d->...kc", self.w_id, id_coeffs)
                + torch.einsum("kcd,...d->...kc", self.w_exp, exp_coeffs))


def homogeneous(points3d: np.ndarray) -> np.ndarray:
    return np.concatenate([points3d, np.ones(points3d.shape[:-1] + (1,), points3d.dtype)], -1)


def fit_affine_cameras(points3d: np.ndarray, points2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares affine cameras M (..., 4, 2) with [X 1] @ M ~ Y, per image.

    Returns (cameras, rms residual in pixels). Coordinates are centred/scaled internally so
    model units of 1e5 and pixels of 1e2 stay well conditioned."""
    points3d = points3d.astype(np.float64)
    points2d = points2d.astype(np.float64)
    centre = points3d.mean(-2, keepdims=True)
    spread = np.sqrt(((points3d - centre) ** 2).sum(-1).mean(-1))[..., None, None] + 1e-12
    normalised = homogeneous((points3d - centre) / spread)
    # Normal equations, batched (4x4 per image).
    ata = np.einsum("...ki,...kj->...ij", normalised, normalised)
    aty = np.einsum("...ki,...kj->...ij", normalised, points2d)
    m_norm = np.linalg.solve(ata + 1e-9 * np.eye(4), aty)
    # Undo the normalisation: [(X - c)/s, 1] @ M = [X, 1] @ M'.
    linear = m_norm[..., :3, :] / spread
    offset = m_norm[..., 3:, :] - np.einsum("...ij,...jk->...ik", centre, linear)
    cameras = np.concatenate([linear, offset], -2)
    residual = np.sqrt(((np.einsum("...ki,...ij->...kj", homogeneous(points3d), cameras) - points2d) ** 2)
                       .sum(-1).mean(-1))
    return cameras.astype(np.float32), residual.astype(np.float32)


def project(points3d: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
    """(..., 68, 3) with cameras (..., 4, 2) -> (..., 68, 2)."""
    ones = torch.ones_like(points3d[..., :1])
    return torch.cat([points3d, ones], -1) @ cameras


def interocular(landmarks2d: np.ndarray) -> np.ndarray:
    """Outer eye corner distance of (..., 68, 2) landmarks (the normaliser of landmark errors)."""
    return np.linalg.norm(landmarks2d[..., 36, :] - landmarks2d[..., 45, :], axis=-1)


def camera_from_pose(yaw: float, pitch: float, roll: float, scale: float, tx: float, ty: float) -> np.ndarray:
    """The (4, 2) affine camera of facedist.morphable's scaled-orthographic Pose (image y down)."""
    from facedist.morphable import angles_to_rotation

    rotation = angles_to_rotation(yaw, pitch, roll)
    linear = scale * rotation[:2].T * np.array([1.0, -1.0])
    return np.concatenate([linear, [[tx, ty]]], 0).astype(np.float32)
