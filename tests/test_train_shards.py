"""Training on Ray Data shards (facedist.training.sharded): the driver's plan, each worker's rows,
the all-reduced normaliser, and the models: with one worker the same as the in-process path.

The first tests run the shard path without Ray (the read tasks called directly, one process);
the last ones run it on a local Ray with Ray Train and Ray Data."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from facedist.training import TrainConfig, train_in_process
from facedist.training import sharded
from facedist.training.data import group_combinations, image_folds
from facedist.training.engine import fit
from facedist.training.synthetic import SyntheticConfig, synthetic_table
from facedist.training.tasks import task_folds

EXPRESSIONS = ("happy", "sad", "surprised")


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    """A synthetic table as 3 Parquet files of 16-row groups, with rows a task cannot use: an
    error row, rows without an expression label."""
    table, _ = synthetic_table(SyntheticConfig(n_people=14, images_per_person=9, seed=5), expressions=EXPRESSIONS)
    status = table.column("status").to_pylist()
    expression = table.column("expression").to_pylist()
    status[7] = "error"
    for i in (3, 40, 41):
        expression[i] = None
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    table = table.set_column(table.schema.get_field_index("expression"), "expression", pa.array(expression))
    folder = tmp_path_factory.mktemp("shards")
    for k, (lo, hi) in enumerate(((0, 50), (50, 90), (90, table.num_rows))):
        pq.write_table(table.slice(lo, hi - lo), folder / f"part-{k}.parquet", row_group_size=16)
    return str(folder)


def _config(table_dir: str, task: str, **kw) -> TrainConfig:
    base = dict(task=task, data=table_dir, epochs=3, batch_size=16, patience=50, seed=2, head="linear",
                input_norm="within_class", noise=0.0, lr=1e-2, folds=3, fold=1)
    base.update(kw)
    return TrainConfig(**base)


def _batch(item: dict) -> dict:
    """An item as the one-row numpy batch Ray Data hands read_item."""
    return {k: np.array([v], dtype=object) for k, v in item.items()}


def _shard_task(config: TrainConfig, world: int = 1, rank: int = 0, shuffle: bool = True):
    plan = sharded.plan_shards(config, world)
    items = list(plan.items[rank])
    if shuffle:   # blocks arrive in any order; rows land at their planned places
        items = items[::-1]
    batches = [sharded.read_item(_batch(item), plan.inputs, plan.widths) for item in items]
    return plan, sharded.task_from_shard(config, plan.meta(), batches, rank)


# ------------------------------------------------------------------------------ vectorised = loops

def _image_folds_loop(groups, k, seed):
    """data.image_folds as it was: a scan of every row per group."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(groups), np.int64)
    for g in sorted(set(groups.tolist()), key=str):
        members = np.flatnonzero(groups == g)
        rng.shuffle(members)
        offset = rng.integers(0, k)
        folds[members] = (np.arange(len(members)) + offset) % k
    return folds


def test_grouping_by_sort_matches_the_scan_it_replaces():
    rng = np.random.default_rng(0)
    groups = np.array([f"p{int(v)}" for v in rng.integers(0, 40, 500)], dtype=object)
    assert (image_folds(groups, 3, 7) == _image_folds_loop(groups, 3, 7)).all()
    # The old combinations: members by a scan, in sorted group order.
    index = np.sort(rng.choice(500, 300, replace=False))
    combos, owners = group_combinations(groups, index, 3, 10, seed=4)
    rng2 = np.random.default_rng(4)
    expected = []
    for g in sorted(set(groups[index].tolist()), key=str):
        members = np.sort(index[groups[index] == g])
        chosen = list(itertools.combinations(members.tolist(), 3))
        if len(chosen) > 10:
            pick = rng2.choice(len(chosen), 10, replace=False)
            chosen = [chosen[i] for i in sorted(pick)]
        expected.extend(chosen)
    assert combos.tolist() == [list(c) for c in expected]
    # Gender folds: by person, stratified by each person's gender.
    subject = np.array([f"s{int(v)}" for v in rng.integers(0, 30, 400)], dtype=object)
    gender = np.array(["male" if int(s[1:]) % 2 else "female" for s in subject], dtype=object)
    folds = task_folds(TrainConfig(task="gender", folds=3, seed=1), subject, gender)
    people = np.array(sorted(set(subject)))
    per_person = _image_folds_loop(np.array([gender[subject == s][0] for s in people], dtype=object), 3, 1)
    assert (folds == per_person[np.searchsorted(people, subject)]).all()


# ------------------------------------------------------------------------------ the plan

def test_plan_puts_each_person_in_one_worker(table_dir):
    config = _config(table_dir, "identity", inputs=("id",))
    plan = sharded.plan_shards(config, world=2)
    from facedist import storage
    from facedist.training.data import TRAINING_COLUMNS, load_data

    data = load_data(table_dir, columns=TRAINING_COLUMNS)
    files = storage.parquet_files(table_dir)
    starts = np.cumsum([0] + [pq.ParquetFile(f).metadata.num_rows for f in files])
    subject = storage.read_table(table_dir, columns=["subject"]).column("subject").to_numpy(zero_copy_only=False)
    people = [set(), set()]
    for rank in range(2):
        seen = {False: [], True: []}
        for item in plan.items[rank]:
            first_group = min(json.loads(item["row_groups"]))   # row groups of 16 rows
            rows = np.frombuffer(item["rows"], np.int64) + starts[files.index(item["file"])] + 16 * first_group
            people[rank] |= set(subject[rows].tolist())
            val = np.frombuffer(item["val"], np.uint8).astype(bool)
            for split in (False, True):
                seen[split].extend(np.frombuffer(item["pos"], np.int64)[val == split].tolist())
        # Every planned position once: the worker's matrices are filled exactly.
        assert sorted(seen[False]) == list(range(plan.n_train[rank]))
        assert sorted(seen[True]) == list(range(plan.n_val[rank]))
    assert people[0] and people[1] and not (people[0] & people[1])
    # Every usable row is planned once (the error row is not).
    assert sum(plan.n_train) + sum(plan.n_val) == len(data)
    assert plan.labels == sorted(set(data.subject.tolist()))


def test_too_many_workers_for_the_people_is_an_error(table_dir):
    with pytest.raises(ValueError, match="use fewer workers"):
        sharded.plan_shards(_config(table_dir, "identity", inputs=("id",)), world=40)


# ------------------------------------------------------------------------------ one worker = in process

@pytest.mark.parametrize("task, kw", [
    ("expression", {"inputs": ("exp", "feature"), "input_norm": "standard"}),
    # The expression preset's recipe: groups scaled to unit variance, then a refit on every row.
    ("expression", {"inputs": ("exp", "feature"), "input_norm": "per_group", "refit": True, "select": "last",
                    "l2": 3e-4}),
    ("gender", {"inputs": ("id",)}),
    ("identity", {"inputs": ("id", "exp"), "input_norm": "within_class_cosine", "prototype_init": True,
                  "max_combos_per_subject": 12, "lr": 1e-3}),
])
def test_one_shard_trains_the_in_process_model(table_dir, monkeypatch, task, kw):
    monkeypatch.setattr(sharded, "ITEM_ROWS", 40)   # several read tasks per file
    from facedist.training.data import TRAINING_COLUMNS, load_data
    from facedist.training.task_registry import make_task

    config = _config(table_dir, task, **kw)
    reference = make_task(config, load_data(table_dir, columns=TRAINING_COLUMNS))
    plan, mine = _shard_task(config)
    assert len(plan.items[0]) > 3

    def same_inputs():
        # The same rows in the same order, the same labels, the same normaliser.
        assert mine.labels == reference.labels
        assert torch.equal(mine.y_train, reference.y_train) and torch.equal(mine.y_val, reference.y_val)
        assert torch.allclose(mine.x_train, reference.x_train, atol=1e-4)
        assert torch.allclose(mine.x_val, reference.x_val, atol=1e-4)
        for key, value in reference.norm.to_dict().items():
            assert np.allclose(mine.norm.to_dict()[key], value, rtol=1e-4, atol=1e-5), key
        assert mine.extra == reference.extra

    same_inputs()
    expected, got = fit(reference, config), fit(mine, config)
    same_inputs()   # after a refit: every row, normalised again
    if config.refit:   # and trained on one view of the worker's buffer, no copy of its inputs
        assert np.shares_memory(mine.x_train.numpy(), mine.x_val.numpy())
    assert [h["accuracy"] for h in got.history] == [h["accuracy"] for h in expected.history]
    for name, weight in expected.best_state.items():
        assert torch.allclose(got.best_state[name], weight, atol=1e-4), name


def test_two_shards_share_one_normaliser(table_dir):
    """Each worker fits on its rows only, yet with the sums all-reduced (here: the two workers'
    statistics added by hand) they get the one-process normaliser; without the reduction not."""
    config = _config(table_dir, "gender", inputs=("id",))
    plan = sharded.plan_shards(config, world=2)
    parts = []
    for rank in range(2):
        batches = [sharded.read_item(_batch(item), plan.inputs, plan.widths) for item in plan.items[rank]]
        parts.append(sharded.load_shard(batches, plan.meta(), rank))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    whole = sharded.fit_normaliser(lambda: iter([(x, y)]), x.shape[1], len(plan.labels), "within_class")
    from facedist.features import Standardizer

    exact = Standardizer.fit(x, y)
    assert np.allclose(whole.whiten, exact.whiten, atol=1e-4) and np.allclose(whole.std, exact.std, rtol=1e-5)
    alone = sharded.fit_normaliser(lambda: iter([parts[0][:2]]), x.shape[1], len(plan.labels), "within_class")
    assert not np.allclose(alone.mean, exact.mean, atol=1e-3)


def test_identity_redraws_combinations_within_people(table_dir):
    config = _config(table_dir, "identity", inputs=("id",), max_combos_per_subject=5, redraw_combos=True)
    _, task = _shard_task(config)
    x0, y0 = task.x_train.clone(), task.y_train.clone()
    x1, y1 = task._combinations(*task.images, task.meta["cap_train"], 99)
    combos, owners = group_combinations(task.names[task.images[1]], np.arange(len(task.images[1])),
                                        task.meta["combo_size"], task.meta["cap_train"], 99)
    # Every combination is one person's photos; a new draw, the same number per person.
    assert all(len(set(task.images[1][c].tolist())) == 1 for c in combos)
    assert sorted(y1.tolist()) == sorted(y0.tolist())
    assert not np.allclose(task.norm(x1), x0.numpy())


def test_many_classes_count_instead_of_a_matrix(table_dir, monkeypatch):
    """Above CONFUSION_MAX_CLASSES validation sums per-class counts; the metrics are the matrix's."""
    from facedist.training import tasks

    config = _config(table_dir, "identity", inputs=("id",), epochs=1)
    task, result = train_in_process(config)
    model = task.build_model()
    model.load_state_dict(result.best_state)
    with torch.no_grad():
        dense = task.summarize(task.evaluate(model.eval(), 0, 1, "cpu"))
        monkeypatch.setattr(tasks, "CONFUSION_MAX_CLASSES", 3)
        counted = task.evaluate(model, 0, 1, "cpu")
    assert "confusion" not in counted and counted["tp"].shape == (len(task.labels),)
    summary = task.summarize(counted)
    assert summary["accuracy"] == dense["accuracy"] and summary["macro_f1"] == pytest.approx(dense["macro_f1"])
    assert summary["n_val"] == dense["n_val"]


# ------------------------------------------------------------------------------ on Ray

@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_on_shards(local_ray, table_dir, tmp_path):
    """run_training reads Ray Data shards: one worker trains the in-process model; two workers,
    each holding a CPU of the two (the read tasks must still run), validate on every row."""
    from facedist.training import load_model_bundle, run_training

    config = _config(table_dir, "expression", inputs=("exp", "feature"), input_norm="standard", epochs=2,
                     ingest="shards", use_gpu=False, cpus_per_worker=1.0, output=str(tmp_path / "one"), name="one")
    torch.set_num_threads(1)
    _, expected = train_in_process(config)
    one = run_training(config)
    bundle = load_model_bundle(one["bundle"])
    assert [h["accuracy"] for h in one["history"]] == [h["accuracy"] for h in expected.history]
    for name, weight in expected.best_state.items():
        assert torch.allclose(bundle["state_dict"][name], weight, atol=1e-4), name
    identity = TrainConfig(**{**config.to_dict(), "num_workers": 2, "output": str(tmp_path / "two"), "name": "two",
                              "task": "identity", "inputs": ("id",)})
    two = run_training(identity)
    last = two["history"][-1]
    assert last["workers"] == 2 and len(last["peak_rss_mb"]) == 2 and min(last["peak_rss_mb"]) > 0
    # Validation counted every person's combinations, whichever worker holds them.
    from facedist.training.data import TRAINING_COLUMNS, load_data
    from facedist.training.task_registry import make_task

    reference = make_task(identity, load_data(table_dir, columns=TRAINING_COLUMNS))
    assert last["n_val"] == len(reference.y_val)
    assert load_model_bundle(two["bundle"])["labels"] == reference.labels


def test_auto_shards_large_tables_only(table_dir, monkeypatch):
    """ingest auto: Ray Data shards from SHARDS_MIN_ROWS rows (counted from the Parquet footers);
    a smaller table goes whole to every worker; cnet never shards."""
    rows = pq.ParquetDataset(table_dir).read(columns=["path"]).num_rows
    assert not sharded.uses_shards(_config(table_dir, "gender"))
    assert sharded.uses_shards(_config(table_dir, "gender", ingest="shards"))
    monkeypatch.setattr(sharded, "SHARDS_MIN_ROWS", rows)
    assert sharded.uses_shards(_config(table_dir, "gender"))
    assert not sharded.uses_shards(_config(table_dir, "gender", ingest="table"))
    assert not sharded.uses_shards(_config(table_dir, "cnet"))
