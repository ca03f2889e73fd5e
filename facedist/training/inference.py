"""Recognizer: the trained bundles together, for the server and scripts.

Loads <dir>/{cnet,identity,gender,expression}/model.pt (any subset; local or s3://) once and
predicts from one person's images given as ExtractionResults or table rows:
    identity    aggregate of the usable images as the identity model was trained (the mean, or
                C-Net confidences with a C-Net bundle and aggregate=cnet), top-k labels
    gender      from the aggregated identity
    expression  per image, class probabilities
    confidence  per image, C-Net's per-dimension confidences (and their mean)
Images that are not usable (error / no face / no coefficients) keep their slot with an error.
"""

from __future__ import annotations

import numpy as np
import torch

from facedist import storage
from facedist.models.cnet import aggregate_identity
from facedist.schema import STATUS_OK
from facedist.training.bundle import BUNDLE_FILE, load_model_bundle
from facedist.training.data import Standardizer, quality_vector

TASKS = ("cnet", "identity", "gender", "expression")


class Recognizer:
    def __init__(self, bundles: dict[str, dict]):
        unknown = set(bundles) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown bundles {sorted(unknown)}")
        self.bundles = bundles
        self.norms = {k: Standardizer.from_dict(b["input_norm"]) for k, b in bundles.items() if b.get("input_norm")}

    @classmethod
    def from_directory(cls, uri: str) -> "Recognizer":
        bundles = {task: load_model_bundle(storage.join(uri, task)) for task in TASKS
                   if storage.exists(storage.join(uri, task, BUNDLE_FILE))}
        if not bundles:
            raise FileNotFoundError(f"no model bundles ({', '.join(TASKS)}) under {uri}")
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
