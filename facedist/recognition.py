"""Serving-time recognition: what turns extraction rows into identity, gender and expressions.

  * quality_vector  C-Net's per-image input, from a table row or an extraction result
  * Standardizer    the input normalisation every bundle carries (fitted in training)
  * Recognizer      the trained bundles together, for the server and scripts

Training fits these (facedist.training uses quality_vector and Standardizer from here); the
server only applies them, so it needs nothing of facedist.training but the bundle format.

The Recognizer loads <dir>/{cnet,identity,gender,expression,age}/model.pt (any subset; local or s3://) once and
predicts from one person's images given as ExtractionResults or table rows:
    identity    aggregate of the usable images as the identity model was trained (the mean, or
                C-Net confidences with aggregate=cnet), top-k labels
    gender      from the aggregated identity
    age         years, from the person's aggregated age descriptor, with the age model's expected
                error (age_mae: its validation MAE, people unseen in its training)
    expression  per image, class probabilities
    confidence  per image, C-Net's per-dimension confidences (and their mean)
Images that are not usable (error / no face / no coefficients) keep their slot with an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import hashlib
import json

import numpy as np
import torch

from facedist import storage
from facedist.models.cnet import aggregate_identity, confidence_weights
from facedist.schema import DEFAULT_INPUTS, INPUT_GROUPS, STATUS_OK, inputs_label
from facedist.training.bundle import BUNDLE_FILE, load_model_bundle

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
    them from a few hundred inputs. On Yale (fit backend) a Mahalanobis nearest-centroid rule on
    combinations of 3 gains much from it (tests/test_training.py shows the effect on a synthetic
    set). Symmetric, so each output dimension stays closest to its own basis dimension (the 1-D
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



RECOGNIZER_TASKS = ("cnet", "identity", "gender", "expression", "age")
# Identity labels ranked per answer, unless the caller asks for another number.
DEFAULT_TOP_K = 5


def bundle_inputs(bundle: dict) -> tuple[str, ...]:
    """The descriptor groups a classifier bundle reads (older bundles: the task's default)."""
    return tuple(bundle.get("extra", {}).get("inputs") or DEFAULT_INPUTS[bundle["task"]])


def row_descriptor(row: dict, inputs: tuple[str, ...], dims: list[int] | None = None) -> np.ndarray | str:
    """One row's descriptor for ``inputs`` (the groups side by side), or why it has none. ``dims``:
    each group's width in training; the pooled feature is cut or zero-padded to it, as the
    training table was, and any other group must match it."""
    parts = []
    for k, name in enumerate(inputs):
        value = row.get(INPUT_GROUPS[name])
        if value is None or np.size(value) == 0:
            return f"no {INPUT_GROUPS[name]} (the model reads {inputs_label(inputs)})"
        value = np.asarray(value, np.float32).ravel()  # a scalar group (fage) is one value
        width = dims[k] if dims else value.size
        if name == "feature":
            value = np.pad(value[:width], (0, max(0, width - value.size)))
        elif value.size != width:
            return f"{INPUT_GROUPS[name]} has {value.size} values, the model was trained on {width}"
        parts.append(value)
    return np.concatenate(parts)


def predict_years(bundle: dict, outputs: np.ndarray) -> np.ndarray:
    """A regressor bundle's (age) outputs (N, 1) in years: its training target's mean + std x output."""
    extra = bundle.get("extra", {})
    return extra.get("target_mean", 0.0) + extra.get("target_std", 1.0) * np.asarray(outputs, np.float64)[:, 0]


def bundle_logits(bundle: dict, x: np.ndarray, norm: Standardizer | None = None) -> np.ndarray:
    """A loaded bundle's outputs for inputs x (N, D): its input normalisation, then its model."""
    norm = norm or Standardizer.from_dict(bundle["input_norm"])
    with torch.no_grad():
        return bundle["model"](torch.as_tensor(norm(x))).numpy()


class Recognizer:
    """The trained bundles together; predict() is the one copy of the decision logic (the server's
    /v1/predict and `facedist predict` both call it)."""

    def __init__(self, bundles: dict[str, dict]):
        unknown = set(bundles) - set(RECOGNIZER_TASKS)
        if unknown:
            raise ValueError(f"unknown bundles {sorted(unknown)}")
        self.bundles = bundles
        self.norms = {k: Standardizer.from_dict(b["input_norm"]) for k, b in bundles.items() if b.get("input_norm")}
        self.inputs = {k: bundle_inputs(b) for k, b in bundles.items() if k != "cnet"}

    @classmethod
    def from_directory(cls, uri: str) -> "Recognizer":
        bundles = {task: load_model_bundle(storage.join(uri, task)) for task in RECOGNIZER_TASKS
                   if storage.exists(storage.join(uri, task, BUNDLE_FILE))}
        if not bundles:
            raise FileNotFoundError(f"no model bundles ({', '.join(RECOGNIZER_TASKS)}) under {uri}")
        return cls(bundles)

    def describe(self) -> dict:
        """What each model reads and how it was built: {task: {inputs, head, labels}}."""
        return {task: {"inputs": list(inputs), "inputs_label": inputs_label(inputs),
                       "head": self.bundles[task].get("extra", {}).get("head", "resnet"),
                       "labels": len(self.bundles[task]["labels"])} for task, inputs in self.inputs.items()}

    def _run(self, task: str, x: np.ndarray) -> np.ndarray:
        return bundle_logits(self.bundles[task], x, self.norms.get(task))

    @staticmethod
    def _softmax(logits: np.ndarray) -> np.ndarray:
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def _descriptors(self, task: str, rows: list[dict], usable: list[int]) -> tuple[np.ndarray, list[int], dict]:
        """The task's descriptor for each usable row: (X, rows that have it, {row: why not})."""
        dims = self.bundles[task].get("extra", {}).get("input_dims")
        got, have, missing = [], [], {}
        for i in usable:
            value = row_descriptor(rows[i], self.inputs[task], dims)
            if isinstance(value, str):
                missing[i] = value
            else:
                got.append(value)
                have.append(i)
        return (np.stack(got) if got else np.zeros((0, 0), np.float32)), have, missing

    def predict(self, items: list, top_k: int = DEFAULT_TOP_K) -> dict:
        """One person's images (ExtractionResults or table rows) -> identity (top-k), gender, age
        (years, and age_mae: the age model's expected error) and each image's expression. Identity and gender aggregate the person's usable images as the
        identity model was trained (the mean, or C-Net's confidences); an image a model cannot
        read (an error row, or a group its inputs need missing) keeps its slot with the reason."""
        return self.predict_many([items], top_k)[0]

    def predict_many(self, people: list[list], top_k: int = DEFAULT_TOP_K) -> list[dict]:
        """predict() for many people at once, one answer per person, in order: each model runs
        once over every person's images (or aggregates), so a batch of people costs a few model
        calls, not a few per person. predict() is this with one person."""
        rows, owner, images = [], [], []
        for p, items in enumerate(people):
            for i, item in enumerate(items):
                row = item.to_row() if hasattr(item, "to_row") else dict(item)
                ok = row.get("status", STATUS_OK) == STATUS_OK
                rows.append(row)
                owner.append(p)
                images.append({"index": i, "ok": ok,
                               "error": None if ok else (row.get("message") or row.get("status") or "unusable")})
        usable = [g for g, image in enumerate(images) if image["ok"]]
        outs: list[dict] = [{"images": [], "n_used": 0, "identity": None, "gender": None, "age": None,
                             "age_mae": None} for _ in people]
        for g, image in enumerate(images):
            outs[owner[g]]["images"].append(image)
        confidence: dict[int, np.ndarray] = {}
        if "cnet" in self.bundles:
            n_feature = int(self.bundles["cnet"]["extra"].get("n_feature", 0))
            with_id = [g for g in usable if _present(rows[g].get("id_coeffs"))]
            if with_id:
                values = self._run("cnet", np.stack([quality_vector(rows[g], n_feature) for g in with_id]))
                for slot, g in enumerate(with_id):
                    confidence[g] = values[slot]
                    images[g]["confidence"] = values[slot].tolist()
                    images[g]["confidence_mean"] = float(values[slot].mean())
        # Aggregate as the identity model was trained (C-Net or the mean), so serving matches training.
        trained_with = self.bundles.get("identity", {}).get("extra", {}).get("aggregate", "cnet")
        has_usable = {owner[g] for g in usable}
        with_confidence = {owner[g] for g in confidence}
        use_cnet = [p in with_confidence and trained_with == "cnet" for p in range(len(people))]
        for p in has_usable:
            outs[p]["aggregation"] = "cnet" if use_cnet[p] else "mean"
        used: set[int] = set()
        with_alpha = [g for g in usable if _present(rows[g].get("id_coeffs"))]
        if with_alpha:
            alpha = np.array([np.asarray(rows[g]["id_coeffs"], np.float32) for g in with_alpha], np.float32)
            for p, value in self._aggregate_many(alpha, with_alpha, owner, confidence, use_cnet).items():
                outs[p]["identity_coeffs"] = value.tolist()
        for task in ("identity", "gender"):
            if task not in self.bundles:
                continue
            x, have, missing = self._descriptors(task, rows, usable)
            for g, why in missing.items():
                images[g]["error"] = images[g]["error"] or why
            if not have:
                continue
            used.update(have)
            aggregates = self._aggregate_many(x, have, owner, confidence, use_cnet)
            order_people = sorted(aggregates)
            probs = self._softmax(self._run(task, np.stack([aggregates[p] for p in order_people])))
            labels = self.bundles[task]["labels"]
            for p, person_probs in zip(order_people, probs):
                order = np.argsort(-person_probs)[: top_k if task == "identity" else len(labels)]
                ranked = [{"label": labels[j], "score": float(person_probs[j])} for j in order]
                outs[p][task] = {"top_k": ranked} if task == "identity" else {
                    "label": ranked[0]["label"], "scores": {r["label"]: r["score"] for r in ranked}}
        if "age" in self.bundles:
            # Like gender: the person's usable images aggregated, then the regressor (for a linear
            # head the same as the mean of the images' ages); the expected error is its validation MAE.
            x, have, missing = self._descriptors("age", rows, usable)
            for g, why in missing.items():
                images[g]["error"] = images[g]["error"] or why
            if have:
                used.update(have)
                aggregates = self._aggregate_many(x, have, owner, confidence, use_cnet)
                order_people = sorted(aggregates)
                years = predict_years(self.bundles["age"],
                                      self._run("age", np.stack([aggregates[p] for p in order_people])))
                mae = self.bundles["age"].get("metrics", {}).get("mae")
                for p, value in zip(order_people, years):
                    outs[p]["age"] = float(value)
                    outs[p]["age_mae"] = None if mae is None else float(mae)
        if "expression" in self.bundles:
            x, have, missing = self._descriptors("expression", rows, usable)
            for g, why in missing.items():
                images[g]["error"] = images[g]["error"] or why
            if have:
                used.update(have)
                probs = self._softmax(self._run("expression", x))
                labels = self.bundles["expression"]["labels"]
                for slot, g in enumerate(have):
                    images[g]["expression"] = {labels[j]: float(probs[slot, j]) for j in range(len(labels))}
                    images[g]["expression_label"] = labels[int(probs[slot].argmax())]
        for g in usable:
            images[g]["ok"] = g in used or not (set(self.inputs) - {"cnet"})
            outs[owner[g]]["n_used"] += int(images[g]["ok"])
        return outs

    @staticmethod
    def _aggregate_many(x: np.ndarray, rows: list[int], owner: list[int], confidence: dict,
                        use_cnet: list[bool]) -> dict[int, np.ndarray]:
        """Each person's aggregate of their rows of x (x[k] is row rows[k]; owner: row -> person):
        the mean, weighted by C-Net where the person aggregates with it and every one of their
        rows has a confidence (per dimension for the identity coefficients alone, else each
        image's mean confidence). People with as many rows go through aggregate_identity together."""
        members: dict[int, list[int]] = {}
        for k, g in enumerate(rows):
            members.setdefault(owner[g], []).append(k)
        buckets: dict[tuple[int, bool], list[int]] = {}
        for p, ks in members.items():
            weighted = use_cnet[p] and all(rows[k] in confidence for k in ks)
            buckets.setdefault((len(ks), weighted), []).append(p)
        out = {}
        for (_, weighted), persons in buckets.items():
            picked = np.array([members[p] for p in persons])  # (people, images)
            weights = None
            if weighted:
                weights = confidence_weights(np.stack([[confidence[rows[k]] for k in members[p]] for p in persons]),
                                             x.shape[1])
            values = aggregate_identity(torch.as_tensor(x[picked]),
                                        None if weights is None else torch.as_tensor(weights)).numpy()
            out.update(zip(persons, values))
        return out


def bundle_version(bundle: dict) -> str:
    """12 hex digits of sha256 over the weights: changes exactly when the model does."""
    digest = hashlib.sha256()
    for name, tensor in sorted(bundle["state_dict"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def check_layouts(bundles: dict[str, dict], backend: str) -> None:
    """Classifiers trained on another regressor's coefficients would answer nonsense: refuse."""
    for task, bundle in bundles.items():
        layout = json.loads(bundle["layout"]) if bundle.get("layout") else None
        if layout and layout.get("backend") and layout["backend"] != backend:
            raise ValueError(f"the {task} model was trained on {layout['backend']} coefficients, not {backend}; "
                             f"extract with backend={layout['backend']}")


def _present(value) -> bool:
    """A list column's value is there and not empty (a list or a numpy array)."""
    return value is not None and len(value) > 0
