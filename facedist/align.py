"""Deep3DFaceRecon's 5-point face alignment (util/preprocess.py align_img, util/load_mats.py load_lm3d).

The R-Net was trained on crops made exactly this way, so we keep upstream's conventions:
landmarks enter POS with the y axis pointing up (y' = H - 1 - y), the image is scaled by
s = 102 / s_pos with integer-truncated sizes and offsets, and a 224 x 224 window is cut out
(black where it leaves the image). Upstream resizes the whole image and then crops; we resize only
the window (PIL's `box`), which samples the same source positions with the same filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

TARGET_SIZE = 224
RESCALE_FACTOR = 102.0

# 1-based iBUG indices: nose tip, left eye corners (2), right eye corners (2), mouth corners (2).
_FIVE_POINT_IDX = np.array([31, 37, 40, 43, 46, 49, 55]) - 1


def five_points(points: np.ndarray) -> np.ndarray:
    """5 points from 68 (2-D or 3-D): eye centres (mean of each eye's corners), nose tip, mouth
    corners, in upstream's order [left eye, right eye, nose, left mouth, right mouth]."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape[0] != 68:
        raise ValueError(f"expected 68 landmarks, got {points.shape}")
    idx = _FIVE_POINT_IDX
    lm5 = np.stack([points[idx[0]], points[idx[[1, 2]]].mean(0), points[idx[[3, 4]]].mean(0),
                    points[idx[5]], points[idx[6]]], axis=0)
    return lm5[[1, 2, 0, 3, 4]]


extract_5p = five_points  # upstream's name


def load_lm3d(path: str | Path | None = None) -> np.ndarray:
    """The standard face's 5 points (5 x 3) from similarity_Lm3D_all.mat (key 'lm', 68 x 3)."""
    return _load_lm3d_cached(str(path) if path is not None else None).copy()


@lru_cache(maxsize=4)
def _load_lm3d_cached(path: str | None) -> np.ndarray:
    from scipy.io import loadmat

    from facedist.assets import resolve

    mat = loadmat(path if path is not None else str(resolve("deep3d/similarity_Lm3D_all.mat")))
    return five_points(np.asarray(mat["lm"], dtype=np.float64))


def pos(xp: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares scaled orthographic fit xp ~ s R x + t (upstream POS).

    xp: 2 x n image points, x: 3 x n model points. Returns t (2,) and s (mean norm of R's rows).
    """
    n = xp.shape[1]
    a = np.zeros([2 * n, 8])
    a[0:2 * n - 1:2, 0:3] = x.T
    a[0:2 * n - 1:2, 3] = 1
    a[1:2 * n:2, 4:7] = x.T
    a[1:2 * n:2, 7] = 1
    b = np.reshape(xp.T, [2 * n, 1])
    k, *_ = np.linalg.lstsq(a, b, rcond=None)
    r1, r2 = k[0:3, 0], k[4:7, 0]
    s = (np.linalg.norm(r1) + np.linalg.norm(r2)) / 2
    return np.array([k[3, 0], k[7, 0]]), float(s)


@dataclass(frozen=True)
class AlignTransform:
    """How an image was mapped to its crop (upstream trans_params = [w0, h0, scale, tx, ty]).

    tx, ty are in y-up image coordinates. The resized image is int(w0*scale) x int(h0*scale);
    the crop window's top-left corner in it is (left, top).
    """

    width: int
    height: int
    scale: float
    tx: float
    ty: float
    target_size: int = TARGET_SIZE

    @property
    def resized_size(self) -> tuple[int, int]:
        return int(np.int32(self.width * self.scale)), int(np.int32(self.height * self.scale))

    @property
    def window(self) -> tuple[int, int]:
        """(left, top) of the crop in the resized image, truncated toward zero as upstream."""
        w, h = self.resized_size
        half = self.target_size / 2
        left = int(np.int32(w / 2 - half + (self.tx - self.width / 2) * self.scale))
        top = int(np.int32(h / 2 - half + (self.height / 2 - self.ty) * self.scale))
        return left, top

    def as_array(self) -> np.ndarray:
        return np.array([self.width, self.height, self.scale, self.tx, self.ty], dtype=np.float64)

    def _offset(self) -> np.ndarray:
        w, h = self.resized_size
        half = self.target_size / 2
        return np.array([w / 2 - half, h / 2 - half])

    def image_to_crop(self, points: np.ndarray) -> np.ndarray:
        """Image points (x right, y down) to crop points (x right, y down), by upstream's landmark
        formula (the one the R-Net's training landmarks used)."""
        p = np.asarray(points, dtype=np.float64)[:, :2].copy()
        p[:, 1] = self.height - 1 - p[:, 1]  # y up
        q = (p - [self.tx, self.ty] + [self.width / 2, self.height / 2]) * self.scale - self._offset()
        q[:, 1] = self.target_size - 1 - q[:, 1]  # back to y down in the crop
        return q

    def crop_to_image(self, points: np.ndarray) -> np.ndarray:
        """Inverse of image_to_crop (e.g. to put reprojected landmarks back on the photo)."""
        q = np.asarray(points, dtype=np.float64)[:, :2].copy()
        q[:, 1] = self.target_size - 1 - q[:, 1]
        p = (q + self._offset()) / self.scale + [self.tx, self.ty] - [self.width / 2, self.height / 2]
        p[:, 1] = self.height - 1 - p[:, 1]
        return p


@dataclass
class AlignedFace:
    crop: np.ndarray          # target x target x 3 float32 RGB in 0..1
    landmarks: np.ndarray     # input landmarks mapped into the crop (x right, y down)
    transform: AlignTransform


def resize_and_crop(image: np.ndarray, transform: AlignTransform) -> np.ndarray:
    """The crop window of the image resized by transform.scale (bicubic, black outside), uint8.

    Same pixels as upstream's resize-everything-then-crop, but only the window is resampled, so a
    small face in a large photo does not blow up the whole photo."""
    h0, w0 = image.shape[:2]
    w, h = transform.resized_size
    left, top = transform.window
    size = transform.target_size
    out = np.zeros((size, size) + image.shape[2:], dtype=np.uint8)
    # the part of the window that lies inside the resized image
    x0, x1 = max(left, 0), min(left + size, w)
    y0, y1 = max(top, 0), min(top + size, h)
    if x1 <= x0 or y1 <= y0:
        return out
    sx, sy = w / w0, h / h0  # PIL's actual scale for a (w, h) resize
    box = (x0 / sx, y0 / sy, x1 / sx, y1 / sy)
    part = Image.fromarray(image).resize((x1 - x0, y1 - y0), resample=Image.BICUBIC, box=box)
    out[y0 - top:y1 - top, x0 - left:x1 - left] = np.asarray(part)
    return out


def estimate_transform(landmarks: np.ndarray, width: int, height: int, lm3d: np.ndarray,
                       target_size: int = TARGET_SIZE, rescale_factor: float = RESCALE_FACTOR) -> AlignTransform:
    """Fit the 5 standard points to the image's (68 or 5 points, x right, y down)."""
    lm = np.asarray(landmarks, dtype=np.float64)[:, :2].copy()
    lm[:, 1] = height - 1 - lm[:, 1]  # upstream works with y up
    lm5 = lm if lm.shape[0] == 5 else five_points(lm)
    t, s = pos(lm5.T, np.asarray(lm3d, dtype=np.float64).T)
    if not np.isfinite(s) or s <= 1e-8:
        raise ValueError("degenerate landmarks: cannot fit the alignment scale")
    return AlignTransform(width=int(width), height=int(height), scale=rescale_factor / s,
                          tx=float(t[0]), ty=float(t[1]), target_size=target_size)


def align_face(image: np.ndarray, landmarks: np.ndarray, lm3d: np.ndarray | None = None,
               target_size: int = TARGET_SIZE, rescale_factor: float = RESCALE_FACTOR) -> AlignedFace:
    """Deep3DFaceRecon's align_img: image RGB uint8 (H, W, 3), landmarks (68 or 5, 2) in pixel
    coordinates (x right, y down). Returns the float 0..1 crop, the landmarks in it, the transform."""
    if lm3d is None:
        lm3d = load_lm3d()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    h0, w0 = image.shape[:2]
    transform = estimate_transform(landmarks, w0, h0, lm3d, target_size, rescale_factor)
    if transform.scale * max(w0, h0) > 1e6 or transform.scale * min(w0, h0) < 1:
        raise ValueError(f"implausible alignment scale {transform.scale:.3g} for a {w0}x{h0} image")
    crop = resize_and_crop(image, transform).astype(np.float32) / 255.0
    return AlignedFace(crop=crop, landmarks=transform.image_to_crop(landmarks), transform=transform)
