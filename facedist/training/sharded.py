"""Ray Train on large tables: the table as Ray Data datasets, one shard per worker.

The driver reads only the columns that decide the split (status, the coefficient lengths,
subject and the task's label) and plans every row: usable or not (table_to_data's rule), its
label code in the global label list, its fold (tasks.task_folds: the in-process path's folds)
and its worker. Workers are assigned by person, so a person's rows land in one worker: identity
combinations are drawn within a worker, and gender's split by person holds there too.

Worker r's dataset is a Ray Data pipeline of read tasks, one per run of Parquet row groups,
each reading only the task's input columns (e.g. face_embedding for gender) and keeping only
worker r's rows, as float32 descriptors (no Python object per row). The worker takes it with
``ray.train.get_dataset_shard(f"shard_{r}")`` and copies it into two preallocated matrices
(training and validation rows, in table order): it holds its rows' descriptors and nothing
else of the table. Input standardisation (and within-class whitening) is fitted on all the
workers' training rows together: sums all-reduced, so every worker has the same normaliser, the
one Standardizer.fit gives in one process (up to float rounding). With one worker the rows, the
folds, the batches and the normaliser are the in-process path's, so the model is too
(tests/test_train_shards.py).

Identity is trained on C(n, 3) combinations drawn from per-person index lists within a worker
(data.group_combinations with the global per-person cap), aggregated chunk by chunk: no list of
every combination and no descriptor copy per combination member. With ``redraw_combos`` new
combinations are drawn every epoch. Validation reports per-class counts instead of a confusion
matrix above tasks.CONFUSION_MAX_CLASSES classes, so 10,000 people cost no 10,000^2 matrix.

C-Net, identity aggregated by C-Net and the image baseline still read the whole table in every
worker (``ingest="table"``, the path before this module).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from facedist import storage
from facedist.schema import INPUT_GROUPS, STATUS_OK, CoefficientLayout, layout_from_schema
from facedist.features import Standardizer
from facedist.training.data import (_fixed_rows, _list_lengths, _take, combos_per_subject, group_combinations,
                                    shared_strings)
from facedist.training.engine import TrainConfig, all_reduce_sums
from facedist.training.tasks import (LABEL_COLUMN, ClassifierTask, combo_size_for, head_model, task_folds,
                                     task_inputs)

SHARDED_TASKS = ("identity", "gender", "expression")
INGESTS = ("auto", "shards", "table")   # TrainConfig.ingest
ITEM_ROWS = 65_536    # rows per read task (consecutive row groups of one file)
CHUNK_ROWS = 8_192    # rows per step of the normaliser's passes
READ_TASKS = 2        # read tasks in flight per worker's dataset
# ingest "auto" shards tables of at least this many rows. Below it every worker holding the whole
# table costs tens of MB, less than starting a Ray Data pipeline per training run.
SHARDS_MIN_ROWS = 20_000


def uses_shards(config: TrainConfig) -> bool:
    """Whether run_training shards the table through Ray Data for this config."""
    if config.ingest not in INGESTS:
        raise ValueError(f"ingest {config.ingest!r}: choose one of {', '.join(INGESTS)}")
    supported = config.task in SHARDED_TASKS and not (config.task == "identity" and config.aggregate != "mean")
    if config.ingest == "shards" and not supported:
        raise ValueError(f"ingest 'shards' trains {', '.join(SHARDED_TASKS)} (identity with --aggregate mean); "
                         f"{config.task!r} reads the whole table in every worker (--ingest table)")
    if config.ingest == "auto" and supported:   # the row count from the Parquet footers alone
        return sum(sum(groups) for _, groups in _parts(config.data)) >= SHARDS_MIN_ROWS
    return supported and config.ingest == "shards"


# ------------------------------------------------------------------------------ the driver's plan

@dataclass
class ShardPlan:
    """What every worker needs to know besides its rows (small: no per-row array)."""

    world: int
    inputs: tuple[str, ...]
    widths: dict                   # group -> width
    labels: list[str]
    layout_json: str
    n_train: list[int]             # per worker: training rows (identity: images)
    n_val: list[int]
    extra: dict                    # the bundle's extra (as classifier_from_split writes it)
    combo_size: int = 0            # identity
    cap_train: int | None = None   # identity: combinations per person (global people counts)
    cap_val: int | None = None
    items: list[list[dict]] = field(default_factory=list)   # per worker: its read tasks (not sent to workers)

    def meta(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "items"}


def _parts(uri: str) -> list[tuple[str, list[int]]]:
    """(file, row-group sizes) for every Parquet file read_table reads, in its order."""
    out = []
    for f in storage.parquet_files(uri):
        fs, path = storage.filesystem_for(f)
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
            out.append((f, [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]))
    return out


def _read(f: str, columns: list[str], row_groups: list[int] | None = None) -> pa.Table:
    fs, path = storage.filesystem_for(f)
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        present = [c for c in columns if c in pf.schema_arrow.names]
        if row_groups is None:
            return pf.read(columns=present)
        return pf.read_row_groups(row_groups, columns=present)


def _list_length_at(f: str, column: str, row_group: int, row: int) -> int:
    """The length of one row's list in ``column`` (0 if null or absent), decoding the row group only
    up to that row (a whole group of a wide column is tens of MB)."""
    fs, path = storage.filesystem_for(f)
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        if column not in pf.schema_arrow.names:
            return 0
        batch = next(pf.iter_batches(batch_size=row + 1, row_groups=[row_group], columns=[column]))
        return int(_lengths(pa.Table.from_batches([batch]), column)[row])


def _lengths(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(table.num_rows, np.int64)
    return _list_lengths(table.column(name))


def _decode(chunks: list[pa.ChunkedArray]) -> np.ndarray:
    """String columns of several files -> one object array (data.shared_strings)."""
    return shared_strings(pa.chunked_array([c for part in chunks for c in part.chunks], pa.string()))


def _assign_workers(subject: np.ndarray, world: int) -> np.ndarray:
    """A worker per row, by person: people by decreasing photo count dealt out in snake order
    (0, 1, ..., w-1, w-1, ..., 0), which balances the rows to within a person or so."""
    if world == 1:
        return np.zeros(len(subject), np.int64)
    keys, inverse, counts = np.unique(np.asarray(subject).astype(str), return_inverse=True, return_counts=True)
    order = np.lexsort((np.arange(len(keys)), -counts))   # biggest first, ties by name
    turn = np.arange(len(keys)) % (2 * world)
    worker_of_rank = np.where(turn < world, turn, 2 * world - 1 - turn)
    worker = np.empty(len(keys), np.int64)
    worker[order] = worker_of_rank
    return worker[inverse]


def plan_shards(config: TrainConfig, world: int) -> ShardPlan:
    """Read the split's columns of config.data and plan ``world`` shards (see the module doc)."""
    column = LABEL_COLUMN[config.task]
    inputs = task_inputs(config)
    parts = _parts(config.data)
    key_columns = ["status", "id_coeffs", "exp_coeffs", "subject", column]
    ok, id_len, exp_len, subjects, values = [], [], [], [], []
    layout = None
    for f, _ in parts:
        table = _read(f, list(dict.fromkeys(key_columns)))
        layout = layout or layout_from_schema(table.schema)
        ok.append(np.asarray(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False)
                             .to_numpy(zero_copy_only=False)))
        id_len.append(_lengths(table, "id_coeffs"))
        exp_len.append(_lengths(table, "exp_coeffs"))
        for name, out in (("subject", subjects), (column, values)):
            out.append(table.column(name) if name in table.column_names
                       else pa.chunked_array([pa.nulls(table.num_rows, pa.string())]))
        del table
    ok, id_len, exp_len = np.concatenate(ok), np.concatenate(id_len), np.concatenate(exp_len)
    candidates = np.flatnonzero(ok & (id_len > 0) & (exp_len > 0))
    if not len(candidates):
        raise ValueError(f"no usable rows (status ok with coefficients) among {len(ok)}")
    n_id, n_exp = int(id_len[candidates[0]]), int(exp_len[candidates[0]])
    usable = ok & (id_len == n_id) & (exp_len == n_exp)
    subject, value = _decode(subjects), (_decode(values) if column != "subject" else None)
    value = subject if value is None else value
    allowed = _allowed(value, config.labels)
    rows = np.flatnonzero(usable & allowed)
    if not len(rows):
        raise ValueError(f"no rows with a {column!r} label for task {config.task!r}")
    labels = list(config.labels) if config.labels is not None else sorted({str(v) for v in set(value[rows].tolist())})
    lookup = {name: i for i, name in enumerate(labels)}
    code = _map_codes(value[rows], lookup)
    folds = task_folds(config, subject[rows], value[rows])
    val = folds == config.fold
    worker = _assign_workers(subject[rows], world)
    if world > 1 and len(np.unique(worker[~val])) < world:
        raise ValueError(f"{world} workers but the training split has people for only "
                         f"{len(np.unique(worker[~val]))}: use fewer workers")

    layout = layout or CoefficientLayout(backend="unknown", n_id=n_id, n_exp=n_exp)
    widths = _widths(config.data, parts, inputs, layout, n_id, n_exp, rows[0])
    extra = {"label_column": column, "fold": config.fold, "folds": config.folds, "seed": config.seed,
             "inputs": list(inputs), "input_dims": [int(widths[g]) for g in inputs], "head": config.head}
    plan = ShardPlan(world=world, inputs=inputs, widths=widths, labels=labels, layout_json=layout.to_json(),
                     n_train=[int(((worker == r) & ~val).sum()) for r in range(world)],
                     n_val=[int(((worker == r) & val).sum()) for r in range(world)], extra=extra)
    if config.task == "identity":
        plan.combo_size, note = combo_size_for(subject[rows], config)
        plan.cap_train = combos_per_subject(config.max_combos_per_subject, config.max_combos_per_epoch,
                                            subject[rows][~val])
        plan.cap_val = combos_per_subject(config.max_combos_per_subject, config.max_combos_per_epoch,
                                          subject[rows][val])
        extra.update(aggregate=config.aggregate, combo_size=plan.combo_size, cnet=config.cnet,
                     **({"note": note} if note else {}))
    extra.update(n_train_images=int((~val).sum()), n_val_images=int(val.sum()))

    # Each row's position among its worker's training (or validation) rows, in table order.
    pos = np.zeros(len(rows), np.int64)
    for r in range(world):
        for split in (False, True):
            mine = np.flatnonzero((worker == r) & (val == split))
            pos[mine] = np.arange(len(mine))
    plan.items = _items(parts, rows, worker, val, pos, code, world)
    return plan


def _allowed(value: np.ndarray, labels) -> np.ndarray:
    """make_classifier_task's rows with a label (among ``labels`` when given)."""
    keep = {v for v in set(value.tolist()) if v is not None and (labels is None or v in labels)}
    return np.fromiter((v in keep for v in value.tolist()), bool, len(value))


def _map_codes(values: np.ndarray, lookup: dict) -> np.ndarray:
    """encode_labels' codes: the label's index, -1 for one not in ``lookup``."""
    table = {v: lookup.get(str(v), -1) for v in set(values.tolist())}
    return np.fromiter((table[v] for v in values.tolist()), np.int64, len(values))


def _widths(uri: str, parts, inputs, layout: CoefficientLayout, n_id: int, n_exp: int, first_row: int) -> dict:
    """Each input group's width: the layout's for id/exp/tex/feature, else the first usable row's."""
    widths = {}
    offset = 0
    for f, groups in parts:   # the file and row group holding the first usable row
        if first_row < offset + sum(groups):
            break
        offset += sum(groups)
    group = 0
    while first_row >= offset + groups[group]:
        offset += groups[group]
        group += 1
    for name in inputs:
        if name == "id":
            widths[name] = n_id
        elif name == "exp":
            widths[name] = n_exp
        elif name == "tex" and layout.n_tex:
            widths[name] = layout.n_tex
        elif name == "feature" and layout.n_feature:
            widths[name] = layout.n_feature
        else:
            widths[name] = _list_length_at(f, INPUT_GROUPS[name], group, first_row - offset)
            if not widths[name]:
                raise ValueError(f"the table has no {INPUT_GROUPS[name]} for every usable row, so it cannot give "
                                 f"the {name!r} input")
    return widths


def _items(parts, rows: np.ndarray, worker, val, pos, code, world: int) -> list[list[dict]]:
    """Per worker, its read tasks: runs of row groups of one file (up to ITEM_ROWS rows) with the
    worker's rows among them (relative to the run's first row) and their pos/val/code."""
    items: list[list[dict]] = [[] for _ in range(world)]
    start = 0
    for f, groups in parts:
        run, run_start, run_rows = [], start, 0
        for g, n in enumerate(groups + [None]):
            if run and (n is None or run_rows + n > ITEM_ROWS):
                lo, hi = np.searchsorted(rows, [run_start, run_start + run_rows])
                for r in range(world):
                    mine = lo + np.flatnonzero(worker[lo:hi] == r)
                    if len(mine):
                        items[r].append({"file": f, "row_groups": json.dumps(run),
                                         "rows": (rows[mine] - run_start).astype(np.int64).tobytes(),
                                         "pos": pos[mine].astype(np.int64).tobytes(),
                                         "val": val[mine].astype(np.uint8).tobytes(),
                                         "code": code[mine].astype(np.int64).tobytes()})
                run_start, run, run_rows = run_start + run_rows, [], 0
            if n is not None:
                run.append(g)
                run_rows += n
        start = run_start
    return items


def scan_groups(uri: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(the descriptor groups every ok row has, the ok rows' subjects, for workflow.few_photos_note),
    read file by file (memory: one file's columns)."""
    filled = {name: True for name in INPUT_GROUPS}
    any_ok, subjects = False, []
    for f, _ in _parts(uri):
        table = _read(f, ["status", "subject", *INPUT_GROUPS.values()])
        ok = pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False)
        if not pc.any(ok).as_py():
            continue
        any_ok = True
        for name, column in INPUT_GROUPS.items():
            filled[name] = filled[name] and column in table.column_names and \
                table.column(column).filter(ok).null_count == 0
        if "subject" in table.column_names:
            subjects.append(table.column("subject").filter(ok))
        del table
    groups = tuple(name for name, has in filled.items() if has and any_ok)
    subject = _decode(subjects) if subjects else np.zeros(0, dtype=object)
    return groups, subject[np.array([s is not None for s in subject.tolist()], bool)] if len(subject) else subject


# ------------------------------------------------------------------------------ read tasks

def _group_matrix(table: pa.Table, name: str, rows: np.ndarray, width: int, out: np.ndarray) -> None:
    """One input group of ``rows`` into ``out`` (len(rows), width) float32; the pooled feature is
    cut or zero-padded to ``width`` (table_to_data's rule), any other group must have it exactly."""
    column = INPUT_GROUPS[name]
    if column not in table.column_names:
        taken, lengths = None, np.zeros(len(rows), np.int64)
    else:
        taken = _take(table.column(column), rows)   # once: the reads below take every row of it
        lengths = _list_lengths(taken)
    every = np.arange(len(rows))
    if name == "feature":
        out[:] = 0
        for w in np.unique(lengths[lengths > 0]):
            sel = np.flatnonzero(lengths == w)
            out[sel, :min(int(w), width)] = _fixed_rows(taken, sel, int(w))[:, :width]
        return
    if (lengths != width).any():
        hint = " (extract with a texture basis: the default for the fit backends)" if name == "tex" else ""
        raise ValueError(f"the table has no {INPUT_GROUPS[name]} for every usable row, so it cannot give the "
                         f"{name!r} input{hint}")
    _fixed_rows(taken, every, width, out=out)


def read_item(batch: dict, inputs: tuple[str, ...], widths: dict) -> dict:
    """A Ray Data map_batches function: one item of ShardPlan.items -> its rows' descriptors."""
    file, groups = str(batch["file"][0]), json.loads(str(batch["row_groups"][0]))
    rows = np.frombuffer(batch["rows"][0], np.int64)
    table = _read(file, [INPUT_GROUPS[g] for g in inputs], groups)
    x = np.empty((len(rows), sum(widths[g] for g in inputs)), np.float32)
    start = 0
    for g in inputs:   # each group straight into its columns of x
        _group_matrix(table, g, rows, widths[g], x[:, start:start + widths[g]])
        start += widths[g]
    return {"x": x, "pos": np.frombuffer(batch["pos"][0], np.int64), "val": np.frombuffer(batch["val"][0], np.uint8),
            "code": np.frombuffer(batch["code"][0], np.int64)}


def shard_dataset(plan: ShardPlan, rank: int):
    """Worker ``rank``'s rows as a Ray Data dataset (one read task per item)."""
    import ray.data

    items = plan.items[rank]
    if not items:
        raise ValueError(f"worker {rank} has no rows")
    # No CPU reserved: the read tasks run while the training workers, which may hold every CPU of
    # the cluster, wait for them; two at a time per worker bound the memory in flight.
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_item, batch_size=1, batch_format="numpy", num_cpus=0, concurrency=READ_TASKS,
        fn_kwargs={"inputs": tuple(plan.inputs), "widths": dict(plan.widths)})


def load_shard(batches, meta: dict, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, code_train, x_val, code_val) of worker ``rank`` from its dataset's batches
    (dicts of numpy arrays, any order): rows land at their planned positions, table order."""
    width = sum(meta["widths"][g] for g in meta["inputs"])
    n_train = meta["n_train"][rank]
    # One buffer, training rows then validation rows: refit trains on both without a joined copy.
    x_all = np.empty((n_train + meta["n_val"][rank], width), np.float32)
    y_all = np.full(len(x_all), -1, np.int64)
    x_train, x_val, y_train, y_val = x_all[:n_train], x_all[n_train:], y_all[:n_train], y_all[n_train:]
    for batch in batches:
        val = np.asarray(batch["val"]).astype(bool)
        pos, x, code = np.asarray(batch["pos"]), np.asarray(batch["x"]), np.asarray(batch["code"])
        for dest, labels, mask in ((x_train, y_train, ~val), (x_val, y_val, val)):
            _place(dest, labels, pos, x, code, mask)
    if (y_train < 0).any() or (y_val < 0).any():
        raise RuntimeError(f"worker {rank}: the shard is missing rows of its plan")
    return x_train, y_train, x_val, y_val


def _place(dest: np.ndarray, labels: np.ndarray, pos: np.ndarray, x: np.ndarray, code: np.ndarray,
           mask: np.ndarray) -> None:
    """dest[pos[mask]] = x[mask] (and the codes). A read task's rows of one split have consecutive
    positions (both are in table order), so the rows go straight into that slice: no gathered copy."""
    where = pos[mask]
    if not len(where):
        return
    labels[where] = code[mask]
    lo, hi = int(where[0]), int(where[-1]) + 1
    if hi - lo == len(where) and (np.diff(where) == 1).all():
        if mask.all():
            dest[lo:hi] = x
        else:
            np.compress(mask, x, axis=0, out=dest[lo:hi])
    else:
        dest[where] = x[mask]


# ------------------------------------------------------------------------------ the global normaliser

def _chunks(x: np.ndarray, y: np.ndarray):
    for i in range(0, len(x), CHUNK_ROWS):
        yield x[i:i + CHUNK_ROWS], y[i:i + CHUNK_ROWS]


def fit_normaliser(chunks, width: int, n_classes: int, input_norm: str,
                   group_dims: list[int] | None = None) -> Standardizer:
    """Standardizer.fit over every worker's training rows: ``chunks()`` yields this worker's
    (x (rows, width), code) chunks; sums are all-reduced (engine.all_reduce_sums) after each
    pass, so every worker gets the same normaliser. ``group_dims``: the input groups' widths, for
    input_norm per_group (each group scaled to unit total variance)."""
    total, count = np.zeros(width), 0
    for x, _ in chunks():
        total += np.asarray(x, np.float64).sum(0)
        count += len(x)
    reduced = all_reduce_sums({"sum": torch.as_tensor(total), "count": float(count)})
    n = max(reduced["count"], 1.0)
    mean = reduced["sum"].numpy() / n
    squares = np.zeros_like(mean)
    for x, _ in chunks():
        squares += ((np.asarray(x, np.float64) - mean) ** 2).sum(0)
    std = np.sqrt(all_reduce_sums({"s": torch.as_tensor(squares)})["s"].numpy() / n)
    if input_norm == "per_group":
        dims = list(group_dims or [width])
        std = std * np.repeat(np.sqrt(np.asarray(dims, np.float64)), dims)
    norm = Standardizer(mean.astype(np.float32), np.where(std > 1e-6, std, np.inf).astype(np.float32),
                        unit_length=input_norm == "within_class_cosine")
    if not input_norm.startswith("within_class"):
        return norm
    # Within-class whitening (features.within_class_whitening) from class sums and the
    # pooled scatter around the class means.
    d = len(mean)
    sums, counts = torch.zeros(n_classes, d, dtype=torch.float64), torch.zeros(n_classes, dtype=torch.float64)
    for x, y in chunks():
        y = torch.as_tensor(np.asarray(y, np.int64))
        sums.index_add_(0, y, torch.as_tensor(norm(x), dtype=torch.float64))
        counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
    reduced = all_reduce_sums({"sums": sums, "counts": counts})
    counts = reduced["counts"]
    means = reduced["sums"] / counts.clamp_min(1).unsqueeze(1)
    scatter = torch.zeros(d, d, dtype=torch.float64)
    for x, y in chunks():
        y = torch.as_tensor(np.asarray(y, np.int64))
        keep = counts[y] > 1
        residual = torch.as_tensor(norm(x), dtype=torch.float64)[keep] - means[y[keep]]
        scatter += residual.T @ residual
    scatter = all_reduce_sums({"s": scatter})["s"].numpy()
    dof = float((counts[counts > 1] - 1).sum())
    if dof == 0:
        norm.whiten = np.eye(d, dtype=np.float32)
        return norm
    values, vectors = np.linalg.eigh(scatter / dof)
    values = np.maximum(values, max(1e-3 * values.mean(), 1e-12))
    norm.whiten = ((vectors / np.sqrt(values)) @ vectors.T).astype(np.float32)
    return norm


def _normalise_in_place(norm: Standardizer, x: np.ndarray) -> np.ndarray:
    for i in range(0, len(x), CHUNK_ROWS):
        x[i:i + CHUNK_ROWS] = norm(x[i:i + CHUNK_ROWS])
    return x


# The input norms that are x -> (x - mean) / std alone, which refit can undo in place.
AFFINE_NORMS = ("standard", "per_group")


def _denormalise_in_place(norm: Standardizer, x: np.ndarray) -> np.ndarray:
    for i in range(0, len(x), CHUNK_ROWS):
        x[i:i + CHUNK_ROWS] = x[i:i + CHUNK_ROWS] * norm.std + norm.mean
    return x


def _joined(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a then b: a view when they lie one after the other in one buffer (load_shard's), else a copy."""
    base = a.base
    if base is not None and base is b.base and a.flags.c_contiguous and b.flags.c_contiguous \
            and a.ctypes.data + a.nbytes == b.ctypes.data:
        start = (a.ctypes.data - base.ctypes.data) // base.strides[0]
        return base[start:start + len(a) + len(b)]
    return np.concatenate([a, b])


# ------------------------------------------------------------------------------ the task

class ShardClassifierTask(ClassifierTask):
    """ClassifierTask on this worker's rows only, with the plan's global labels and the
    all-reduced normaliser; an epoch goes through this worker's training rows in a random order
    (the in-process permutation with one worker), every worker the same number of batches."""

    def __init__(self, config: TrainConfig, meta: dict, x_train: np.ndarray, y_train: np.ndarray,
                 x_val: np.ndarray, y_val: np.ndarray):
        from facedist.training.tasks import INPUT_NORMS

        if config.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {config.input_norm!r}: choose one of {INPUT_NORMS}")
        self.config = config
        self.labels = list(meta["labels"])
        self.layout_json = meta["layout_json"]
        self.model_name = head_model(config.task, config.head)
        self.extra = dict(meta["extra"])
        self.group_dims = list(self.extra["input_dims"])
        self.meta = meta
        self.refitting = False
        if config.redraw_combos and config.refit:
            raise ValueError("redraw_combos and refit do not go together")
        self._set_inputs(x_train, y_train, x_val, y_val)
        self.model_config = {"input_dim": int(self.x_train.shape[1]), "num_classes": len(self.labels),
                             "dropout": config.dropout}
        self._count_steps()

    def _count_steps(self) -> None:
        """Every worker runs as many batches as the one with the most rows (DDP steps together)."""
        local = max(len(self.y_train) // self.config.batch_size, 1)
        self.steps = int(all_reduce_sums({"s": float(local)}, op="max")["s"])

    def _set_inputs(self, x_train, y_train, x_val, y_val) -> None:
        self._fit_norm(x_train, y_train, x_val, y_val)

    def _fit_norm(self, x_train, y_train, x_val, y_val) -> None:
        """ClassifierTask._fit_norm from every worker's rows; normalises the arrays in place. Refit's
        second fit undoes an affine norm in place (_all_rows); for the others a copy is kept."""
        if self.config.refit and not self.refitting and self.config.input_norm not in AFFINE_NORMS:
            self.raw = (x_train.copy(), y_train, x_val.copy(), y_val)
        self.norm = fit_normaliser(lambda: _chunks(x_train, y_train), x_train.shape[1], len(self.labels),
                                   self.config.input_norm, self.group_dims)
        # In a refit the validation rows are part of x_train's buffer, normalised with it.
        within = np.shares_memory(x_val, x_train)
        self.arrays = (_normalise_in_place(self.norm, x_train), y_train,
                       x_val if within else _normalise_in_place(self.norm, x_val), y_val)
        self.x_train, self.y_train, self.x_val, self.y_val = map(torch.from_numpy, self.arrays)

    def use_all_rows(self) -> None:
        self.refitting = True
        super().use_all_rows()
        self.raw = None
        self._count_steps()

    def _all_rows(self):
        """ClassifierTask._all_rows without a copy of the inputs where the norm is affine: the rows
        are put back to their raw values in place (x * std + mean, equal to float rounding) and
        trained on as one view of load_shard's buffer."""
        if self.config.input_norm not in AFFINE_NORMS:
            return super()._all_rows()
        x_train, y_train, x_val, y_val = self.arrays   # load_shard's views, normalised in place
        _denormalise_in_place(self.norm, x_train)
        _denormalise_in_place(self.norm, x_val)
        return _joined(x_train, x_val), _joined(y_train, y_val), x_val, y_val

    def _init_prototypes(self, model) -> None:
        """ClassifierTask's prototypes from every worker's class sums."""
        if self.model_name != "linear_head":
            raise ValueError("prototype_init needs the linear head")
        sums = torch.zeros(len(self.labels), self.x_train.shape[1], dtype=torch.float64)
        for i in range(0, len(self.y_train), CHUNK_ROWS):
            sums.index_add_(0, self.y_train[i:i + CHUNK_ROWS], self.x_train[i:i + CHUNK_ROWS].double())
        means = all_reduce_sums({"sums": sums})["sums"]
        means = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            model.fc.weight.copy_(means * self.PROTOTYPE_SCALE / self.x_train.shape[1] ** 0.5)
            model.fc.bias.zero_()

    def train_epoch(self, model, optimizer, epoch: int, rank: int, world: int, device) -> dict:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch + 7919 * rank)
        n, bs = len(self.y_train), self.config.batch_size
        index = torch.randperm(n, generator=generator)
        if self.steps * bs > n and self.steps > max(n // bs, 1):
            index = index.repeat(math.ceil(self.steps * bs / n))   # a smaller shard goes round again
        return self._train_batches(model, optimizer, index, self.steps, device)

    def evaluate(self, model, rank: int, world: int, device) -> dict:
        return self._evaluate_rows(model, torch.arange(len(self.y_val)), device)


class ShardIdentityTask(ShardClassifierTask):
    """Identity on this worker's people: combinations of each person's training (validation)
    images, aggregated by the mean, are the inputs; drawn once, or every epoch (redraw_combos)."""

    def _set_inputs(self, x_train, y_train, x_val, y_val) -> None:
        meta = self.meta
        self.names = np.asarray(self.labels, dtype=object)
        self.images = (x_train, y_train)
        xt, yt = self._combinations(x_train, y_train, meta["cap_train"], self.config.seed)
        xv, yv = self._combinations(x_val, y_val, meta["cap_val"], self.config.seed + 1)
        super()._set_inputs(xt, yt, xv, yv)
        if not self.config.redraw_combos:
            self.images = None

    def _combinations(self, x: np.ndarray, y: np.ndarray, cap: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
        from facedist.models.cnet import aggregate_identity

        combos, owners = group_combinations(self.names[y], np.arange(len(y)), self.meta["combo_size"], cap, seed)
        out = np.empty((len(combos), x.shape[1]), np.float32)
        for i in range(0, len(combos), CHUNK_ROWS):
            out[i:i + CHUNK_ROWS] = aggregate_identity(torch.as_tensor(x[combos[i:i + CHUNK_ROWS]]), None).numpy()
        return out, y[combos[:, 0]] if len(combos) else np.zeros(0, np.int64)

    def train_epoch(self, model, optimizer, epoch: int, rank: int, world: int, device) -> dict:
        if self.images is not None and epoch > 0:
            x, y = self._combinations(*self.images, self.meta["cap_train"], self.config.seed * 1000 + epoch)
            if len(y) != len(self.y_train):
                raise RuntimeError("a redraw changed the number of combinations")
            self.x_train, self.y_train = torch.from_numpy(_normalise_in_place(self.norm, x)), torch.from_numpy(y)
        return super().train_epoch(model, optimizer, epoch, rank, world, device)


def task_from_shard(config: TrainConfig, meta: dict, batches, rank: int) -> ShardClassifierTask:
    """The task of one worker from its shard's batches (see load_shard)."""
    arrays = load_shard(batches, meta, rank)
    cls = ShardIdentityTask if config.task == "identity" else ShardClassifierTask
    return cls(config, meta, *arrays)
