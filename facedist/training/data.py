"""From a coefficients table to training arrays: quality vectors, per-image cameras, splits by
image, C(n, r) combinations per subject. The quality vector and the input standardisation are
the serving-time ones (facedist.recognition), re-exported here for the training code."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from facedist.recognition import Standardizer, quality_vector, within_class_whitening  # noqa: F401
from facedist.schema import STATUS_OK, CoefficientLayout, layout_from_schema

@dataclass
class CoefficientData:
    """The usable (status ok, coefficients present) rows of a coefficients table, as arrays."""

    path: np.ndarray
    subject: np.ndarray            # object arrays of str or None
    expression: np.ndarray
    gender: np.ndarray
    alpha: np.ndarray              # (N, n_id)
    beta: np.ndarray               # (N, n_exp)
    quality: np.ndarray            # (N, Q), see quality_vector
    landmarks: np.ndarray          # (N, 68, 2) detected; NaN where missing
    landmarks_fit: np.ndarray      # (N, 68, 2); NaN where missing
    box: np.ndarray                # (N, 4); NaN where missing
    layout: CoefficientLayout
    n_feature: int = 0
    skipped: int = 0               # rows not usable (error / no face / missing coefficients)
    extra: dict = field(default_factory=dict)
    texture: np.ndarray | None = None  # (N, K, 4) uint8 RGBA samples (facedist.texture), if the table has them
    tex: np.ndarray | None = None      # (N, n_tex) tex_coeffs, if every usable row has them

    def __len__(self) -> int:
        return len(self.path)

    def subset(self, index: np.ndarray) -> "CoefficientData":
        index = np.asarray(index)
        take = lambda a: a[index]  # noqa: E731
        return CoefficientData(take(self.path), take(self.subject), take(self.expression), take(self.gender),
                               take(self.alpha), take(self.beta), take(self.quality), take(self.landmarks),
                               take(self.landmarks_fit), take(self.box), self.layout, self.n_feature,
                               texture=None if self.texture is None else take(self.texture),
                               tex=None if self.tex is None else take(self.tex))

    def labels(self, column: str) -> np.ndarray:
        return getattr(self, column)


def _points(values, n: int) -> np.ndarray:
    if values is None or len(values) != n:
        return np.full((n // 2 if n else 0, 2), np.nan, np.float32) if n else np.zeros((0, 2), np.float32)
    return np.asarray(values, np.float32).reshape(-1, 2)


def table_to_data(table: pa.Table, n_feature: int | None = None) -> CoefficientData:
    """Keep ok rows with both coefficient vectors; rows in = usable rows + skipped."""
    layout = layout_from_schema(table.schema)
    rows = table.to_pylist()
    usable = [r for r in rows if r.get("status") == STATUS_OK and r.get("id_coeffs") and r.get("exp_coeffs")]
    if not usable:
        raise ValueError(f"no usable rows (status ok with coefficients) among {len(rows)}")
    n_id, n_exp = len(usable[0]["id_coeffs"]), len(usable[0]["exp_coeffs"])
    usable = [r for r in usable if len(r["id_coeffs"]) == n_id and len(r["exp_coeffs"]) == n_exp]
    if layout is None:
        layout = CoefficientLayout(backend=str(usable[0].get("backend") or "unknown"), n_id=n_id, n_exp=n_exp)
    if n_feature is None:
        lengths = [len(r["feature"]) for r in usable if r.get("feature")]
        n_feature = max(lengths) if lengths else 0
    col = lambda k: np.array([r.get(k) for r in usable], dtype=object)  # noqa: E731
    lm = lambda k: np.stack([_points(r.get(k), 136) for r in usable])  # noqa: E731
    boxes = np.array([r["box"] if r.get("box") and len(r["box"]) == 4 else [np.nan] * 4 for r in usable],
                     np.float32)
    texture = None
    if layout.n_texture_vertices:
        from facedist.texture import texture_array
        texture = texture_array([r.get("texture") for r in usable], layout.n_texture_vertices)
    tex = None
    if layout.n_tex and all(r.get("tex_coeffs") and len(r["tex_coeffs"]) == layout.n_tex for r in usable):
        tex = np.array([r["tex_coeffs"] for r in usable], np.float32)
    return CoefficientData(
        texture=texture, tex=tex, path=col("path"), subject=col("subject"), expression=col("expression"), gender=col("gender"),
        alpha=np.array([r["id_coeffs"] for r in usable], np.float32),
        beta=np.array([r["exp_coeffs"] for r in usable], np.float32),
        quality=np.stack([quality_vector(r, n_feature) for r in usable]),
        landmarks=lm("landmarks"), landmarks_fit=lm("landmarks_fit"), box=boxes, layout=layout,
        n_feature=n_feature, skipped=len(rows) - len(usable))


def load_data(uri: str, n_feature: int | None = None) -> CoefficientData:
    """Read a coefficients table (local or s3://, file or directory of parts) via facedist.storage."""
    from facedist import storage

    return table_to_data(storage.read_table(uri), n_feature)


def image_folds(groups: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index per image, stratified by group (subject or label): every group's images are
    spread over the k folds, so a fold's images never appear in the other folds' combinations."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(groups), np.int64)
    for g in sorted(set(groups.tolist()), key=str):
        members = np.flatnonzero(groups == g)
        rng.shuffle(members)
        offset = rng.integers(0, k)
        folds[members] = (np.arange(len(members)) + offset) % k
    return folds


def combos_per_subject(max_per_subject: int, max_per_epoch: int | None, subjects: np.ndarray) -> int:
    """The per-person cap on C(n, r) combinations: max_per_subject, lowered so that the people in
    ``subjects`` make about max_per_epoch combinations in all (never under 4 each)."""
    if not max_per_epoch:
        return max_per_subject
    people = max(1, len(set(subjects.tolist())))
    return min(max_per_subject, max(4, max_per_epoch // people))


def group_combinations(groups: np.ndarray, index: np.ndarray, r: int = 3, max_per_group: int | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All C(n, r) combinations of the images in ``index`` within each group (capped at
    ``max_per_group``, sampled). Returns (combos (M, r) of image indices, group of each combo).
    A group with fewer than r images contributes one combination of all its images, padded by
    repeating the last one (so small groups are not silently dropped)."""
    rng = np.random.default_rng(seed)
    combos, owners = [], []
    for g in sorted(set(groups[index].tolist()), key=str):
        members = np.sort(index[groups[index] == g])
        total = math.comb(len(members), r)
        if len(members) < r:
            chosen = [tuple(members) + (members[-1],) * (r - len(members))]
        elif max_per_group and total > max(4 * max_per_group, 1000):
            # Too many to list (C(200, 3) is 1.3M): draw distinct sorted combinations directly.
            found: set[tuple] = set()
            while len(found) < max_per_group:
                found.add(tuple(sorted(rng.choice(members, r, replace=False).tolist())))
            chosen = sorted(found)
        else:
            chosen = list(itertools.combinations(members.tolist(), r))
            if max_per_group and len(chosen) > max_per_group:
                pick = rng.choice(len(chosen), max_per_group, replace=False)
                chosen = [chosen[i] for i in sorted(pick)]
        combos.extend(chosen)
        owners.extend([g] * len(chosen))
    return np.asarray(combos, np.int64).reshape(-1, r), np.asarray(owners, dtype=object)


def encode_labels(values: np.ndarray, labels: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Label strings -> int codes (-1 for unknown/None), with the sorted label list."""
    if labels is None:
        labels = sorted({str(v) for v in values if v is not None})
    lookup = {name: i for i, name in enumerate(labels)}
    codes = np.array([lookup.get(str(v), -1) if v is not None else -1 for v in values], np.int64)
    return codes, list(labels)
