"""Serving-time recognition: what turns extraction rows into identity, gender and expressions.

  * quality_vector  C-Net's per-image input, from a table row or an extraction result
  * Standardizer    the input normalisation every bundle carries (fitted in training)
  * Recognizer      the trained bundles together, for the server and scripts

Training fits these (facedist.training uses quality_vector and Standardizer from here); the
server only applies them, so it needs nothing of facedist.training but the bundle format.

The Recognizer loads <dir>/{cnet,identity,gender,expression}/model.pt (any subset; local or s3://) once and
predicts from one person's images given as ExtractionResults or table rows:
    identity    aggregate of the usable images as the identity model was trained (the mean, or
                C-Net confidences with aggregate=cnet), top-k labels
    gender      from the aggregated identity
    expression  per image, class probabilities
    confidence  per image, C-Net's per-dimension confidences (and their mean)
Images that are not usable (error / no face / no coefficients) keep their slot with an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facedist import storage
from facedist.models.cnet import aggregate_identity
from facedist.schema import STATUS_OK
from facedist.training.bundle import BUNDLE_FILE, load_model_bundle

QUALITY_SCALARS = ("yaw", "pitch", "roll", "abs_yaw", "det_score", "landmark_error", "log_landmark_error")


def _floats(value, default: float = 0.0) -> float:
    return default if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


def quality_vector(row: dict, n_feature: int) -> np.ndarray:
    """C-Net's per-image input: pose (degrees/90), |yaw|, detection score, landmark residual
    (and its log), then the regressor's pooled feature (zeros when the backend stores none).
    ``row`` is a table row or ExtractionResult.to_row()."""
    yaw, pitch, roll = (_floats(row.get(k)) for k in ("yaw", "pitch", "roll"))
    residual = _floats(row.get("landmark_error"), 0.05)
    scalars = [yaw / 90, pitch / 90, roll / 90, abs(yaw) / 90, _floats(row.get("det_score"), 1.0),
               residual, np.log(max(residual, 1e-4))]
    feature = np.zeros(n_feature, np.float32)
    raw = row.get("feature")
    if raw is not None and n_feature:
        raw = np.asarray(raw, np.float32).ravel()[:n_feature]
        feature[: raw.size] = raw
    return np.concatenate([np.asarray(scalars, np.float32), feature])


@dataclass
class Standardizer:
    """x -> (x - mean) / std, then optionally @ whiten; fitted on training inputs and stored in
    every bundle.

    ``whiten`` is within-class whitening (the symmetric inverse square root of the within-class
    covariance, as in LDA / WCCN): identity coefficients of one person vary with expression and
    pose along a few correlated directions, and a small classifier does not learn to discount
    them from a few hundred inputs. On Yale (fit backend) a Mahalanobis nearest-centroid rule on
    combinations of 3 gains much from it (tests/test_training.py shows the effect on a synthetic
    set). Symmetric, so each output dimension stays closest to its own basis dimension (the 1-D
    ResNet's order)."""

    mean: np.ndarray
    std: np.ndarray
    whiten: np.ndarray | None = None

    @classmethod
    def fit(cls, x: np.ndarray, groups: np.ndarray | None = None, floor: float = 1e-3) -> "Standardizer":
        """groups: a class per row; when given, also fit within-class whitening. ``floor``: the
        smallest eigenvalue kept, relative to the mean one (directions with almost no
        within-class spread would otherwise be blown up)."""
        x = np.asarray(x, np.float64)
        norm = cls(x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-6).astype(np.float32))
        if groups is not None:
            norm.whiten = within_class_whitening(norm(x), np.asarray(groups), floor)
        return norm

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float32) - self.mean) / self.std
        if self.whiten is not None:
            z = z @ self.whiten
        return z.astype(np.float32)

    def to_dict(self) -> dict:
        out = {"mean": self.mean.tolist(), "std": self.std.tolist()}
        if self.whiten is not None:
            out["whiten"] = self.whiten.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        whiten = d.get("whiten")
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32),
                   None if whiten is None else np.asarray(whiten, np.float32))


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



RECOGNIZER_TASKS = ("cnet", "identity", "gender", "expression")


class Recognizer:
    def __init__(self, bundles: dict[str, dict]):
        unknown = set(bundles) - set(RECOGNIZER_TASKS)
        if unknown:
            raise ValueError(f"unknown bundles {sorted(unknown)}")
        self.bundles = bundles
        self.norms = {k: Standardizer.from_dict(b["input_norm"]) for k, b in bundles.items() if b.get("input_norm")}

    @classmethod
    def from_directory(cls, uri: str) -> "Recognizer":
        bundles = {task: load_model_bundle(storage.join(uri, task)) for task in RECOGNIZER_TASKS
                   if storage.exists(storage.join(uri, task, BUNDLE_FILE))}
        if not bundles:
            raise FileNotFoundError(f"no model bundles ({', '.join(RECOGNIZER_TASKS)}) under {uri}")
        return cls(bundles)

    def _run(self, task: str, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.bundles[task]["model"](torch.as_tensor(self.norms[task](x))).numpy()

    @staticmethod
    def _softmax(logits: np.ndarray) -> np.ndarray:
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def predict(self, items: list, top_k: int = 5) -> dict:
        rows = [item.to_row() if hasattr(item, "to_row") else dict(item) for item in items]
        usable = [i for i, r in enumerate(rows)
                  if r.get("status", STATUS_OK) == STATUS_OK and r.get("id_coeffs") and r.get("exp_coeffs")]
        images = [{"index": i, "ok": i in usable,
                   "error": None if i in usable else (rows[i].get("message") or rows[i].get("status") or "unusable")}
                  for i in range(len(rows))]
        out: dict = {"images": images, "n_used": len(usable), "identity": None, "gender": None}
        if not usable:
            return out
        alpha = np.array([rows[i]["id_coeffs"] for i in usable], np.float32)
        beta = np.array([rows[i]["exp_coeffs"] for i in usable], np.float32)
        confidence = None
        if "cnet" in self.bundles:
            n_feature = int(self.bundles["cnet"]["extra"].get("n_feature", 0))
            quality = np.stack([quality_vector(rows[i], n_feature) for i in usable])
            confidence = self._run("cnet", quality)
            for slot, i in enumerate(usable):
                images[i]["confidence"] = confidence[slot].tolist()
                images[i]["confidence_mean"] = float(confidence[slot].mean())
        # Aggregate as the identity model was trained (C-Net or the mean), so serving matches training.
        trained_with = self.bundles.get("identity", {}).get("extra", {}).get("aggregate", "cnet")
        weights = confidence if confidence is not None and trained_with == "cnet" else None
        aggregate = aggregate_identity(torch.as_tensor(alpha)[None],
                                       None if weights is None else torch.as_tensor(weights)[None])[0].numpy()
        out["aggregation"] = "cnet" if weights is not None else "mean"
        out["identity_coeffs"] = aggregate.tolist()
        for task in ("identity", "gender"):
            if task in self.bundles:
                probs = self._softmax(self._run(task, aggregate[None]))[0]
                labels = self.bundles[task]["labels"]
                order = np.argsort(-probs)[: top_k if task == "identity" else len(labels)]
                ranked = [{"label": labels[j], "score": float(probs[j])} for j in order]
                out[task] = {"top_k": ranked} if task == "identity" else {"label": ranked[0]["label"],
                                                                         "scores": {r["label"]: r["score"] for r in ranked}}
        if "expression" in self.bundles:
            probs = self._softmax(self._run("expression", beta))
            labels = self.bundles["expression"]["labels"]
            for slot, i in enumerate(usable):
                images[i]["expression"] = {labels[j]: float(probs[slot, j]) for j in range(len(labels))}
                images[i]["expression_label"] = labels[int(probs[slot].argmax())]
        return out
