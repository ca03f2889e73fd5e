"""Serving-time recognition: what turns extraction rows into identity, gender and expressions.

  * Recognizer      the trained bundles together, for the server and scripts

The per-image features it applies (quality_vector, Standardizer) live in facedist.features, which
training fits them with; the server needs nothing of facedist.training but the bundle format.

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

import hashlib
import json

import numpy as np
import torch

from facedist import storage
from facedist.features import Standardizer, quality_vector
from facedist.models.cnet import aggregate_identity, confidence_weights
from facedist.schema import DEFAULT_INPUTS, INPUT_GROUPS, STATUS_OK, inputs_label
from facedist.training.bundle import BUNDLE_FILE, load_model_bundle

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
        with_id = [g for g in usable if _present(rows[g].get("id_coeffs"))]
        if with_id:
            id_coeffs = np.array([np.asarray(rows[g]["id_coeffs"], np.float32) for g in with_id], np.float32)
            for p, value in self._aggregate_many(id_coeffs, with_id, owner, confidence, use_cnet).items():
                outs[p]["identity_coeffs"] = value.tolist()
        for task in ("identity", "gender"):
            if task not in self.bundles:
                continue
            x, have = self._usable_inputs(task, rows, usable, images, used)
            if not have:
                continue
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
            x, have = self._usable_inputs("age", rows, usable, images, used)
            if have:
                aggregates = self._aggregate_many(x, have, owner, confidence, use_cnet)
                order_people = sorted(aggregates)
                years = predict_years(self.bundles["age"],
                                      self._run("age", np.stack([aggregates[p] for p in order_people])))
                mae = self.bundles["age"].get("metrics", {}).get("mae")
                for p, value in zip(order_people, years):
                    outs[p]["age"] = float(value)
                    outs[p]["age_mae"] = None if mae is None else float(mae)
        if "expression" in self.bundles:
            x, have = self._usable_inputs("expression", rows, usable, images, used)
            if have:
                probs = self._softmax(self._run("expression", x))
                labels = self.bundles["expression"]["labels"]
                for slot, g in enumerate(have):
                    images[g]["expression"] = {labels[j]: float(probs[slot, j]) for j in range(len(labels))}
                    images[g]["expression_label"] = labels[int(probs[slot].argmax())]
        for g in usable:
            images[g]["ok"] = g in used or not (set(self.inputs) - {"cnet"})
            outs[owner[g]]["n_used"] += int(images[g]["ok"])
        return outs

    def _usable_inputs(self, task: str, rows: list[dict], usable: list[int], images: list[dict],
                       used: set[int]) -> tuple[np.ndarray, list[int]]:
        """The task's inputs of the usable images that have every group it reads (those images go
        into ``used``); an image missing a group gets why as its error, unless it has one."""
        x, have, missing = self._descriptors(task, rows, usable)
        for g, why in missing.items():
            images[g]["error"] = images[g]["error"] or why
        used.update(have)
        return x, have

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
