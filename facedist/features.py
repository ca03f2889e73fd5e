"""The per-image features that training fits and serving applies: one module both import.

  * quality_vector / quality_matrix  C-Net's per-image input, from a table row or many rows
  * Standardizer                     the input normalisation every model bundle carries
  * within_class_whitening           the identity metric (Standardizer's whitening, C-Net's metric)

Plain numpy: the trainer (facedist.training), the Recognizer and the reports read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUALITY_SCALARS = ("yaw", "pitch", "roll", "abs_yaw", "det_score", "landmark_error", "log_landmark_error")
# The row's columns quality_vector reads (the scalars, then the pooled feature).
QUALITY_COLUMNS = ("yaw", "pitch", "roll", "det_score", "landmark_error", "feature")


def quality_vector(row: dict, n_feature: int) -> np.ndarray:
    """C-Net's per-image input: pose (degrees/90), |yaw|, detection score, landmark residual
    (and its log), then the regressor's pooled feature (zeros when the backend stores none).
    ``row`` is a table row or ExtractionResult.to_row()."""
    feature = None
    raw = row.get("feature")
    if raw is not None and n_feature:
        raw = np.asarray(raw, np.float32).ravel()[:n_feature]
        feature = np.zeros((1, n_feature), np.float32)
        feature[0, : raw.size] = raw
    scalars = [np.array([np.nan if row.get(k) is None else float(row[k])]) for k in QUALITY_COLUMNS[:-1]]
    return quality_matrix(*scalars, feature, n_feature)[0]


def quality_matrix(yaw, pitch, roll, det_score, landmark_error, feature: np.ndarray | None,
                   n_feature: int) -> np.ndarray:
    """quality_vector for N rows at once: (N,) float arrays with NaN where a value is missing
    (pose 0, score 1, residual 0.05 stand in), feature (N, n_feature) or None (zeros)."""
    fill = lambda v, d: np.where(np.isnan(np.asarray(v, np.float64)), d, v)  # noqa: E731
    yaw, pitch, roll = fill(yaw, 0.0), fill(pitch, 0.0), fill(roll, 0.0)
    residual = fill(landmark_error, 0.05)
    scalars = np.stack([yaw / 90, pitch / 90, roll / 90, np.abs(yaw) / 90, fill(det_score, 1.0), residual,
                        np.log(np.maximum(residual, 1e-4))], 1).astype(np.float32)
    if feature is None:
        feature = np.zeros((len(scalars), n_feature), np.float32)
    return np.concatenate([scalars, np.asarray(feature, np.float32)], 1)


@dataclass
class Standardizer:
    """x -> (x - mean) / std, then optionally @ whiten; fitted on training inputs and stored in
    every bundle.

    ``whiten`` is within-class whitening (the symmetric inverse square root of the within-class
    covariance, as in LDA / WCCN): identity coefficients of one person vary with expression and
    pose along a few correlated directions, and a small classifier does not learn to discount
    them from a few hundred inputs (tests/test_training.py shows the effect on a synthetic set).
    Symmetric, so each output dimension stays closest to its own basis dimension (the 1-D
    ResNet's order)."""

    mean: np.ndarray
    std: np.ndarray
    whiten: np.ndarray | None = None
    # Scale every output vector to the same length, sqrt(D) (after whitening; each dimension then
    # keeps about unit spread): a linear head scores by cosine, which is what matches a person
    # seen in one photo to their other photos.
    unit_length: bool = False

    @classmethod
    def fit(cls, x: np.ndarray, groups: np.ndarray | None = None, floor: float = 1e-3,
            unit_length: bool = False, group_dims: list[int] | None = None) -> "Standardizer":
        """groups: a class per row; when given, also fit within-class whitening. ``floor``: the
        smallest eigenvalue kept, relative to the mean one (directions with almost no
        within-class spread would otherwise be blown up). ``group_dims``: the widths of the input
        groups side by side; each group is then scaled to unit total variance (its dimensions'
        spread times the square root of its width)."""
        x = np.asarray(x, np.float64)
        # A dimension constant on the training rows (a ReLU feature never active there) carries
        # nothing learned: it maps to 0, where dividing by a tiny spread would blow a new row up.
        std = x.std(0)
        if group_dims is not None:
            if sum(group_dims) != x.shape[1]:
                raise ValueError(f"group widths {group_dims} do not add up to {x.shape[1]} dimensions")
            std = std * np.repeat(np.sqrt(np.asarray(group_dims, np.float64)), group_dims)
        norm = cls(x.mean(0).astype(np.float32), np.where(std > 1e-6, std, np.inf).astype(np.float32),
                   unit_length=unit_length)
        if groups is not None:
            norm.whiten = within_class_whitening(norm(x), np.asarray(groups), floor)
        return norm

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float32) - self.mean) / self.std
        if self.whiten is not None:
            z = z @ self.whiten
        if self.unit_length:
            z = z * np.sqrt(z.shape[-1]) / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        return z.astype(np.float32)

    def to_dict(self) -> dict:
        out = {"mean": self.mean.tolist(), "std": self.std.tolist()}
        if self.whiten is not None:
            out["whiten"] = self.whiten.tolist()
        if self.unit_length:
            out["unit_length"] = True
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        whiten = d.get("whiten")
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32),
                   None if whiten is None else np.asarray(whiten, np.float32), bool(d.get("unit_length", False)))


def within_class_whitening(z: np.ndarray, groups: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """(D, D) symmetric W with W Sw W = I, Sw the pooled within-class covariance of z (N, D).
    Classes with one row add nothing; with no within-class spread at all, the identity."""
    z = np.asarray(z, np.float64)
    keys = np.asarray([str(g) for g in groups])
    centred, dof = [], 0
    for key in np.unique(keys):
        members = z[keys == key]
        if len(members) > 1:
            centred.append(members - members.mean(0))
            dof += len(members) - 1
    if dof == 0:
        return np.eye(z.shape[1], dtype=np.float32)
    residual = np.concatenate(centred)
    scatter = residual.T @ residual / dof
    values, vectors = np.linalg.eigh(scatter)
    values = np.maximum(values, max(floor * values.mean(), 1e-12))
    return ((vectors / np.sqrt(values)) @ vectors.T).astype(np.float32)
