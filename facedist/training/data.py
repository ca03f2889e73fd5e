"""From a coefficients table to training arrays: quality vectors, per-image cameras, splits by
image, C(n, r) combinations per subject. The quality vector and the input standardisation are
the serving-time ones (facedist.recognition), re-exported here for the training code."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

import pyarrow.compute as pc

from facedist.features import QUALITY_SCALARS, quality_matrix
from facedist.schema import COLUMNS, INPUT_GROUPS, STATUS_OK, CoefficientLayout, layout_from_schema

@dataclass
class CoefficientData:
    """The usable (status ok, coefficients present) rows of a coefficients table, as arrays."""

    path: np.ndarray
    subject: np.ndarray            # object arrays of str or None
    expression: np.ndarray
    gender: np.ndarray
    id_coeffs: np.ndarray          # (N, n_id)
    exp_coeffs: np.ndarray         # (N, n_exp)
    quality: np.ndarray            # (N, Q), see features.quality_vector
    landmarks: np.ndarray          # (N, 68, 2) detected; NaN where missing
    landmarks_fit: np.ndarray      # (N, 68, 2); NaN where missing
    box: np.ndarray                # (N, 4); NaN where missing
    layout: CoefficientLayout
    n_feature: int = 0
    skipped: int = 0               # rows not usable (error / no face / missing coefficients)
    extra: dict = field(default_factory=dict)
    texture: np.ndarray | None = None  # (N, K, 4) uint8 RGBA samples (facedist.texture), if the table has them
    tex_coeffs: np.ndarray | None = None  # (N, n_tex), if every usable row has them
    # Other descriptor groups (schema.INPUT_GROUPS beyond id / exp / tex / feature), by group name,
    # where every usable row has them.
    groups: dict = field(default_factory=dict)
    age: np.ndarray | None = None      # (N,) the age label in years, NaN where unknown (None: no column)

    def __len__(self) -> int:
        return len(self.path)

    def subset(self, index: np.ndarray) -> "CoefficientData":
        index = np.asarray(index)
        take = lambda a: a[index]  # noqa: E731
        return CoefficientData(take(self.path), take(self.subject), take(self.expression), take(self.gender),
                               take(self.id_coeffs), take(self.exp_coeffs), take(self.quality), take(self.landmarks),
                               take(self.landmarks_fit), take(self.box), self.layout, self.n_feature,
                               texture=None if self.texture is None else take(self.texture),
                               tex_coeffs=None if self.tex_coeffs is None else take(self.tex_coeffs),
                               groups={k: take(v) for k, v in self.groups.items()},
                               age=None if self.age is None else take(self.age))

    def labels(self, column: str) -> np.ndarray:
        return getattr(self, column)

    def group(self, name: str) -> np.ndarray | None:
        """One descriptor group's (N, D) array, None where the table lacks it."""
        if name == "id":
            return self.id_coeffs
        if name == "exp":
            return self.exp_coeffs
        if name == "tex":
            return self.tex_coeffs
        if name == "feature":
            return self.quality[:, len(QUALITY_SCALARS):] if self.n_feature else None
        return self.groups.get(name)

    def available_inputs(self) -> tuple[str, ...]:
        return tuple(n for n in INPUT_GROUPS if self.group(n) is not None)

    def descriptor(self, inputs: tuple[str, ...]) -> np.ndarray:
        """The groups side by side, (N, sum of widths) float32; a group the table lacks is a
        ValueError that says what to do."""
        parts = []
        for name in inputs:
            values = self.group(name)
            if values is None:
                hint = (" (extract with a texture basis: the default for the fit backends)" if name == "tex" else "")
                raise ValueError(f"the table has no {INPUT_GROUPS[name]} for every usable row, so it cannot give "
                                 f"the {name!r} input{hint}; it has {', '.join(self.available_inputs())}")
            parts.append(np.asarray(values, np.float32))
        return np.hstack(parts)


def _take(column: pa.ChunkedArray, rows: np.ndarray) -> pa.ChunkedArray:
    """column[rows]; the column itself when rows is every row in order (the usual case: no copy)."""
    if len(rows) == len(column) and (len(rows) == 0 or (rows[0] == 0 and rows[-1] == len(rows) - 1)):
        return column
    return column.take(pa.array(rows, pa.int64()))


def _list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    lengths = pc.list_value_length(column)
    return np.asarray(pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False), np.int64)


def _fixed_rows(column: pa.ChunkedArray, rows: np.ndarray, width: int, dtype=np.float32,
                fill=np.nan, out: np.ndarray | None = None) -> np.ndarray:
    """(len(rows), width) from a list column, without a Python object per row; rows whose list
    is missing or of another length are ``fill``. ``out``: write there (e.g. a column slice of a
    wider matrix) instead of a new array, so wide groups are copied once."""
    taken = _take(column, rows)
    lengths = _list_lengths(taken)
    out = np.empty((len(rows), width), dtype) if out is None else out
    good = lengths == width
    if good.all():   # the usual case: chunk by chunk straight into out (no concatenated copy)
        start = 0
        for chunk in (taken.chunks if isinstance(taken, pa.ChunkedArray) else [taken]):
            n = len(chunk)
            if n:
                flat = chunk.flatten().to_numpy(zero_copy_only=False)
                out[start:start + n] = np.asarray(flat, dtype).reshape(n, width)
            start += n
        return out
    out[~good] = fill
    if good.any():
        flat = pc.list_flatten(taken.filter(pa.array(good))).to_numpy(zero_copy_only=False)
        out[good] = np.asarray(flat, dtype).reshape(-1, width)
    return out


def _scalars(table: pa.Table, name: str, rows: np.ndarray) -> np.ndarray:
    """A numeric column at ``rows`` as float64, NaN for null or absent."""
    if name not in table.column_names:
        return np.full(len(rows), np.nan)
    taken = _take(table.column(name), rows)
    return np.asarray(pc.fill_null(pc.cast(taken, pa.float64()), np.nan).to_numpy(zero_copy_only=False))


def _strings(table: pa.Table, name: str, rows: np.ndarray) -> np.ndarray:
    """A string column at ``rows`` as an object array; each distinct value is one Python object
    shared by its rows (8 bytes a row, not a string per row)."""
    if name not in table.column_names:
        return np.full(len(rows), None, dtype=object)
    return shared_strings(_take(table.column(name), rows))


def shared_strings(column: pa.ChunkedArray) -> np.ndarray:
    """A string column as an object array whose distinct values are shared objects (None for null)."""
    uniq = pc.unique(column)
    values = np.empty(len(uniq) + 1, dtype=object)
    values[:-1] = uniq.to_pylist()   # None where the column has nulls
    codes = pc.fill_null(pc.index_in(column, value_set=uniq), len(uniq))
    return values[np.asarray(codes.to_numpy(zero_copy_only=False), np.int64)]


def table_to_data(table: pa.Table, n_feature: int | None = None) -> CoefficientData:
    """Keep ok rows with both coefficient vectors; rows in = usable rows + skipped. Columns are
    converted whole (Arrow to numpy), so the cost is in the columns the table holds, not in rows
    of Python objects: read only the columns you need (load_data)."""
    layout = layout_from_schema(table.schema)
    ok = np.asarray(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False).to_numpy(zero_copy_only=False))
    id_len, exp_len = _list_lengths(table.column("id_coeffs")), _list_lengths(table.column("exp_coeffs"))
    candidates = np.flatnonzero(ok & (id_len > 0) & (exp_len > 0))
    if not len(candidates):
        raise ValueError(f"no usable rows (status ok with coefficients) among {table.num_rows}")
    n_id, n_exp = int(id_len[candidates[0]]), int(exp_len[candidates[0]])
    rows = candidates[(id_len[candidates] == n_id) & (exp_len[candidates] == n_exp)]
    if layout is None:
        backend = _strings(table, "backend", rows[:1])[0]
        layout = CoefficientLayout(backend=str(backend or "unknown"), n_id=n_id, n_exp=n_exp)
    has_feature = "feature" in table.column_names
    feature_len = _list_lengths(table.column("feature"))[rows] if has_feature else np.zeros(len(rows), np.int64)
    if n_feature is None:
        n_feature = int(feature_len.max()) if len(rows) else 0
    feature = None
    if n_feature and has_feature:
        # Shorter features are zero-padded, longer ones cut (quality_vector's rule for one row).
        feature = np.zeros((len(rows), n_feature), np.float32)
        for width in np.unique(feature_len[feature_len > 0]):
            sel = np.flatnonzero(feature_len == width)
            values = _fixed_rows(table.column("feature"), rows[sel], int(width))
            feature[sel, :min(int(width), n_feature)] = values[:, :n_feature]
    quality = quality_matrix(_scalars(table, "yaw", rows), _scalars(table, "pitch", rows),
                             _scalars(table, "roll", rows), _scalars(table, "det_score", rows),
                             _scalars(table, "landmark_error", rows), feature, n_feature)
    points = lambda name: (_fixed_rows(table.column(name), rows, 136).reshape(-1, 68, 2)  # noqa: E731
                           if name in table.column_names else np.full((len(rows), 68, 2), np.nan, np.float32))
    texture = None
    if layout.n_texture_vertices and "texture" in table.column_names:
        texture = _fixed_rows(table.column("texture"), rows, 4 * layout.n_texture_vertices, np.uint8, 0
                              ).reshape(len(rows), layout.n_texture_vertices, 4)
    tex_coeffs = None
    if layout.n_tex and "tex_coeffs" in table.column_names \
            and (_list_lengths(table.column("tex_coeffs"))[rows] == layout.n_tex).all():
        tex_coeffs = _fixed_rows(table.column("tex_coeffs"), rows, layout.n_tex)
    groups = {}
    for name, column in INPUT_GROUPS.items():
        if name in ("id", "exp", "tex", "feature") or column not in table.column_names:
            continue
        if not pa.types.is_list(table.column(column).type):  # one number per row (fage)
            values = _scalars(table, column, rows)
            if len(rows) and np.isfinite(values).all():
                groups[name] = values.astype(np.float32)[:, None]
            continue
        lengths = _list_lengths(table.column(column))[rows]
        if len(rows) and lengths[0] > 0 and (lengths == lengths[0]).all():
            groups[name] = _fixed_rows(table.column(column), rows, int(lengths[0]))
    box = (_fixed_rows(table.column("box"), rows, 4) if "box" in table.column_names
           else np.full((len(rows), 4), np.nan, np.float32))
    return CoefficientData(
        texture=texture, tex_coeffs=tex_coeffs, groups=groups, path=_strings(table, "path", rows),
        subject=_strings(table, "subject", rows), expression=_strings(table, "expression", rows),
        gender=_strings(table, "gender", rows),
        id_coeffs=_fixed_rows(table.column("id_coeffs"), rows, n_id),
        exp_coeffs=_fixed_rows(table.column("exp_coeffs"), rows, n_exp),
        quality=quality, landmarks=points("landmarks"), landmarks_fit=points("landmarks_fit"), box=box, layout=layout,
        n_feature=n_feature, skipped=table.num_rows - len(rows),
        age=_scalars(table, "age", rows) if "age" in table.column_names else None)


# What a task reads of the table: everything but the sampled texture, which only the person
# report (its texture basis per fold) and the texture tools need.
TRAINING_COLUMNS = tuple(c for c in COLUMNS if c != "texture")


def load_data(uri: str, n_feature: int | None = None, columns: tuple[str, ...] | None = None) -> CoefficientData:
    """Read a coefficients table (local or s3://, file or directory of parts) via facedist.storage;
    ``columns``: read only these (e.g. TRAINING_COLUMNS), None for all."""
    from facedist import storage

    return table_to_data(storage.read_table(uri, columns=list(columns) if columns else None), n_feature)


def group_members(groups: np.ndarray) -> tuple[list, list[np.ndarray]]:
    """The distinct groups in the order ``sorted(set(groups), key=str)`` and each one's row
    indices in ascending order: one sort instead of a scan of every row per group (10,000
    people x 100,000 rows)."""
    groups = np.asarray(groups)
    if not len(groups):
        return [], []
    keys = groups.astype(str)
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(uniq)))])
    return ([groups[i] for i in first.tolist()],
            [order[bounds[j]:bounds[j + 1]] for j in range(len(uniq))])


def sample_people(data: CoefficientData, max_rows: int | None, seed: int = 0) -> tuple[CoefficientData, str | None]:
    """At most ``max_rows`` rows of ``data``, whole people (a seeded shuffle of the people, taken
    while their rows fit), and a note saying so; ``data`` itself when it fits or max_rows is
    None/0. Rows without a subject count as one person."""
    if not max_rows or len(data) <= max_rows:
        return data, None
    people, members = group_members(np.asarray(data.subject, dtype=object))
    order = np.random.default_rng(seed).permutation(len(people))
    sizes = np.array([len(members[i]) for i in order])
    taken = order[np.cumsum(sizes) <= max_rows] if sizes[0] <= max_rows else order[:1]
    rows = np.sort(np.concatenate([members[i] for i in taken]))
    note = (f"the table has {len(data):,} rows of {len(people):,} people; this uses {len(rows):,} rows of "
            f"{len(taken):,} people (at most {max_rows:,} rows, whole people drawn with seed {seed})")
    return data.subset(rows), note


def image_folds(groups: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index per image, stratified by group (subject or label): every group's images are
    spread over the k folds, so a fold's images never appear in the other folds' combinations."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(groups), np.int64)
    for members in group_members(groups)[1]:
        members = members.copy()
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
    index = np.asarray(index)
    for g, positions in zip(*group_members(groups[index])):
        members = np.sort(index[positions])
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
