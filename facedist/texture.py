"""Texture of the fitted face: colour sampled at the mesh's vertices, and a PCA texture basis.

A 3DMM is geometry and texture. The regressors here give geometry only, so texture comes from the photo:
every fitted face is sampled at the same ~2,000 model vertices (an even grid over the mean face,
facedist.mesh), which puts all faces in dense correspondence whatever their pose or size.

- TextureSampler: image + coefficients + pixel camera -> (K, 4) uint8 RGBA per vertex, A = 255
  where the vertex is visible (inside the image and facing the camera; self-occlusion behind the
  nose on strongly turned faces is not modelled). The image is first area-downscaled so that
  neighbouring vertices lie about 2 px apart: each sample then averages the patch around its
  vertex instead of aliasing on pores and hair. Stored in the table's ``texture`` column.
- TextureBasis: PCA of normalised samples (each channel divided by its mean over the visible
  vertices, which removes the photo's exposure and white balance; then each vertex's channel
  scaled to unit variance, so the smooth skin counts as much as the high-contrast eyes, brows and
  hairline, which would otherwise take the leading components), fitted on a training
  collection (`facedist texture fit`), stored as a versioned .npz model file. ``project`` gives
  ``tex_coeffs`` in units of each component's standard deviation; invisible vertices take the
  basis mean, so they pull a coefficient towards 0 rather than inventing colour.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from facedist.morphable import MorphableModel, apply_affine

TEXTURE_POINTS = 2000            # sampled vertices (the grid lands within 5% of it)
TEXTURE_COMPONENTS = 80          # as Deep3DFaceRecon's texture coefficients
SAMPLE_SPACING_PX = 2.0          # vertex spacing after the anti-aliasing downscale
MIN_FACING = 0.2                 # a vertex is visible when its normal's z is at least this
BASIS_FORMAT = "facedist.texture_basis/1"


def _vertex_normals(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = (points[triangles[:, k]] for k in range(3))
    face_normals = np.cross(b - a, c - a)
    normals = np.zeros_like(points)
    for k in range(3):
        np.add.at(normals, triangles[:, k], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


class TextureSampler:
    """Colour at K fixed vertices of a fitted face (see the module docstring)."""

    def __init__(self, model: MorphableModel, n_points: int = TEXTURE_POINTS):
        from facedist.mesh import decimated_mesh

        self.model = model
        self.indices, triangles = decimated_mesh(model, n_points)
        rows = (3 * self.indices[:, None] + np.arange(3)).ravel()
        self._mean = model.mean[rows].astype(np.float64)
        # Wind every triangle so that its normal faces the viewer (+z) on the frontal mean face.
        a, b, c = (self._mean.reshape(-1, 3)[triangles[:, k]] for k in range(3))
        backwards = np.cross(b - a, c - a)[:, 2] < 0
        self.triangles = np.where(backwards[:, None], triangles[:, ::-1], triangles)
        self._id_basis = model.id_basis[rows].astype(np.float64)
        self._exp = model.exp_basis[rows].astype(np.float64)
        mean_xy = self._mean.reshape(-1, 3)[:, :2]
        # model units between neighbouring vertices: sets how far the image is downscaled
        self._spacing = float(np.sqrt(np.prod(np.ptp(mean_xy, 0)) / len(self.indices)))
        digest = hashlib.sha1(self.indices.astype(np.int64).tobytes()).hexdigest()[:12]
        self.version = f"{model.name}_v{len(self.indices)}:{digest}"

    @property
    def n_vertices(self) -> int:
        return len(self.indices)

    def points(self, id_coeffs, exp_coeffs, camera: np.ndarray) -> np.ndarray:
        """(K, 3) pixel positions (u, v, depth) of the sampled vertices."""
        id_coeffs, exp_coeffs = self.model._coeffs(id_coeffs, exp_coeffs)
        X = (self._mean + self._id_basis @ id_coeffs + self._exp @ exp_coeffs).reshape(-1, 3)
        return apply_affine(X, np.asarray(camera, np.float64))

    def sample(self, image: np.ndarray, id_coeffs, exp_coeffs, camera: np.ndarray) -> np.ndarray:
        """(K, 4) uint8 RGBA: the colour at each vertex, alpha 255 where it is visible."""
        rgb = np.asarray(image)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[:, :, None], 3, axis=2)
        camera = np.asarray(camera, np.float64)
        P = self.points(id_coeffs, exp_coeffs, camera).astype(np.float64)
        h, w = rgb.shape[:2]
        # Normals in the pixel frame: camera's linear part flips y, so flip it back to face +z.
        normals = _vertex_normals(P * np.array([1.0, -1.0, 1.0]), self.triangles)
        inside = (P[:, 0] >= 0) & (P[:, 0] <= w - 1) & (P[:, 1] >= 0) & (P[:, 1] <= h - 1)
        visible = inside & (normals[:, 2] >= MIN_FACING)
        out = np.zeros((len(P), 4), np.uint8)
        if not inside.any():
            return out
        # Crop the face's region, downscale it so vertices are ~SAMPLE_SPACING_PX apart, sample.
        px_per_unit = float(np.linalg.norm(camera[:2, :3], axis=1).mean())
        factor = min(1.0, SAMPLE_SPACING_PX / max(self._spacing * px_per_unit, 1e-6))
        x0, y0 = (max(int(np.floor(P[inside, k].min())) - 2, 0) for k in (0, 1))
        x1, y1 = min(int(np.ceil(P[inside, 0].max())) + 3, w), min(int(np.ceil(P[inside, 1].max())) + 3, h)
        region = rgb[y0:y1, x0:x1]
        if factor < 1.0:
            size = (max(1, round(region.shape[1] * factor)), max(1, round(region.shape[0] * factor)))
            fx, fy = size[0] / region.shape[1], size[1] / region.shape[0]
            region = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
        else:
            fx = fy = 1.0
        # pixel centres: x_small = (x + 0.5) * f - 0.5
        mx = ((P[:, 0] - x0 + 0.5) * fx - 0.5).astype(np.float32).reshape(1, -1)
        my = ((P[:, 1] - y0 + 0.5) * fy - 0.5).astype(np.float32).reshape(1, -1)
        colour = cv2.remap(np.ascontiguousarray(region), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]
        out[:, :3] = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
        out[:, 3] = np.where(visible, 255, 0)
        return out


def texture_array(column_values, n_vertices: int) -> np.ndarray:
    """A table's ``texture`` values (flat RGBA lists or None) -> (N, K, 4) uint8; rows without a
    texture come back all invisible."""
    out = np.zeros((len(column_values), n_vertices, 4), np.uint8)
    for i, value in enumerate(column_values):
        if value is not None and len(value) == 4 * n_vertices:
            out[i] = np.asarray(value, np.uint8).reshape(n_vertices, 4)
    return out


def normalised_colour(texture: np.ndarray) -> np.ndarray:
    """(N, K, 4) RGBA -> (N, K, 3) float64, each channel over its visible mean; NaN where hidden."""
    texture = np.asarray(texture)
    colour = texture[..., :3].astype(np.float64)
    visible = texture[..., 3] > 0
    colour[~visible] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.nanmean(colour, axis=1, keepdims=True)
        return colour / np.maximum(np.nan_to_num(gain, nan=1.0), 1.0)


@dataclass
class TextureBasis:
    """PCA of normalised vertex colours (see the module docstring)."""

    mean: np.ndarray          # (3K,)
    scale: np.ndarray         # (3K,) per-value standard deviation on the training samples
    components: np.ndarray    # (C, 3K) orthonormal rows
    std: np.ndarray           # (C,) per-component standard deviation on the training samples
    sampler_version: str      # TextureSampler.version the samples were taken with
    n_train: int = 0

    @classmethod
    def fit(cls, textures: np.ndarray, sampler_version: str, n_components: int = TEXTURE_COMPONENTS) -> "TextureBasis":
        """textures: (N, K, 4) RGBA samples of a training collection (rows with nothing visible
        are left out)."""
        textures = np.asarray(textures)
        textures = textures[(textures[..., 3] > 0).any(1)]
        if len(textures) < 2:
            raise ValueError(f"a texture basis needs at least 2 faces with visible vertices, got {len(textures)}")
        colour = normalised_colour(textures).reshape(len(textures), -1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a vertex hidden in every face: mean 1
            mean = np.nan_to_num(np.nanmean(colour, axis=0), nan=1.0)
        x = np.where(np.isnan(colour), mean, colour) - mean
        scale = np.maximum(x.std(0), 1e-3)
        _, s, vt = np.linalg.svd(x / scale, full_matrices=False)
        n = int(min(n_components, len(s), max(len(textures) - 1, 1)))
        std = s[:n] / np.sqrt(max(len(textures) - 1, 1))
        return cls(mean.astype(np.float32), scale.astype(np.float32), vt[:n].astype(np.float32),
                   np.maximum(std, 1e-6).astype(np.float32), sampler_version, len(textures))

    @property
    def n_components(self) -> int:
        return len(self.std)

    @property
    def n_vertices(self) -> int:
        return self.mean.size // 3

    @cached_property
    def version(self) -> str:
        digest = hashlib.sha1(self.components.tobytes() + self.mean.tobytes() + self.scale.tobytes()).hexdigest()[:12]
        return f"pca{self.n_components}_{self.sampler_version.split(':')[0]}:{digest}"

    def project(self, textures: np.ndarray) -> np.ndarray:
        """(N, K, 4) RGBA -> (N, C) float32 coefficients in standard deviations."""
        textures = np.asarray(textures)
        if textures.ndim != 3 or textures.shape[1] != self.n_vertices:
            raise ValueError(f"texture basis takes {self.n_vertices} vertices, got shape {textures.shape}")
        colour = normalised_colour(textures).reshape(len(textures), -1)
        x = (np.where(np.isnan(colour), self.mean, colour) - self.mean) / self.scale
        return ((x @ self.components.T) / self.std).astype(np.float32)

    # ---- the model file

    def to_bytes(self) -> bytes:
        meta = {"format": BASIS_FORMAT, "sampler_version": self.sampler_version, "n_train": self.n_train,
                "version": self.version}
        arrays = {"mean": self.mean, "scale": self.scale, "components": self.components, "std": self.std,
                  "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        # np.savez's layout with a fixed timestamp, so the same basis is the same bytes (its sha256 is pinned).
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(entry, "w") as fh:
                    np.lib.format.write_array(fh, np.asarray(array), allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TextureBasis":
        with np.load(io.BytesIO(data)) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("format") != BASIS_FORMAT:
                raise ValueError(f"not a facedist texture basis (format {meta.get('format')!r})")
            return cls(z["mean"], z["scale"], z["components"], z["std"], meta["sampler_version"],
                       int(meta.get("n_train", 0)))

    def save(self, uri: str, options=None) -> str:
        from facedist import storage

        storage.write_bytes(uri, self.to_bytes(), options)
        return uri

    @classmethod
    def load(cls, uri: str, options=None) -> "TextureBasis":
        from facedist import storage

        return cls.from_bytes(storage.read_bytes(uri, options))


def table_textures(table) -> tuple[np.ndarray, str]:
    """(N, K, 4) RGBA of a coefficients table's rows and the sampler version from its layout."""
    from facedist.schema import layout_from_schema

    layout = layout_from_schema(table.schema)
    if layout is None or not layout.n_texture_vertices:
        raise ValueError("the table holds no sampled texture (extract it with texture sampling on, "
                         "the default, with the tddfa-fit, tddfa or fit backend)")
    return texture_array(table.column("texture").to_pylist(), layout.n_texture_vertices), layout.texture.split("+")[0]


def fit_texture_basis(data_uri: str, out_uri: str, n_components: int = TEXTURE_COMPONENTS,
                      options=None) -> TextureBasis:
    """`facedist texture fit`: a basis from the ok rows of a coefficients table, saved to out_uri."""
    from facedist import storage
    from facedist.schema import STATUS_OK

    table = storage.read_table(data_uri, options)
    table = table.filter(np.asarray([s == STATUS_OK for s in table.column("status").to_pylist()]))
    textures, sampler_version = table_textures(table)
    basis = TextureBasis.fit(textures, sampler_version, n_components)
    basis.save(out_uri, options)
    return basis
