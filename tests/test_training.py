"""In-process training: C-Net beats the mean on synthetic sets, classifiers learn, resume, bundles,
the Recognizer, the report on a real Yale table (tddfa) when it can be built quickly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from facedist.training import TrainConfig, load_model_bundle, save_model_bundle
from facedist.features import Standardizer
from facedist.training.data import image_folds, group_combinations, table_to_data
from facedist.training.engine import fit
from facedist.recognition import Recognizer
from facedist.training.synthetic import SyntheticConfig, synthetic_table
from facedist.training.tasks import CNetTask, make_classifier_task, metrics_from_confusion

EXPRESSIONS = ("happy", "sad", "surprised")


@pytest.fixture(scope="module")
def synthetic():
    torch.set_num_threads(1)
    table, truth = synthetic_table(SyntheticConfig(n_people=60, images_per_person=8, seed=1), expressions=EXPRESSIONS)
    return table, truth, table_to_data(table)


def test_split_by_image_keeps_validation_out_of_training_combinations(synthetic):
    _, _, data = synthetic
    folds = image_folds(data.subject, 3, seed=0)
    train, val = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    combos, owners = group_combinations(data.subject, train, 3)
    assert not set(combos.ravel()) & set(val)
    assert all(len({data.subject[i] for i in c}) == 1 and data.subject[c[0]] == o for c, o in zip(combos, owners))
    # Each subject's 8 images over 3 folds: 5 or 6 train images -> C(5,3)=10 or C(6,3)=20 combos.
    counts = {o: (owners == o).sum() for o in set(owners)}
    assert set(counts.values()) <= {10, 20}


def test_an_epoch_of_identity_combinations_is_bounded_with_many_people(synthetic):
    from facedist.training.data import combos_per_subject

    _, _, data = synthetic  # 60 people x 8 images
    train = np.flatnonzero(image_folds(data.subject, 3, seed=0) != 0)
    assert combos_per_subject(40, None, data.subject[train]) == 40           # no bound asked for
    assert combos_per_subject(40, 6000, data.subject[train]) == 40           # few people: the cap
    cap = combos_per_subject(40, 360, data.subject[train])                   # 60 people: 6 each
    combos, owners = group_combinations(data.subject, train, 3, cap)
    assert cap == 6 and len(combos) == 60 * 6 and len(set(map(tuple, combos))) == len(combos)
    assert combos_per_subject(40, 10, data.subject[train]) == 4              # never under 4 each


def test_combinations_too_many_to_list_are_drawn_distinct_and_in_the_group():
    subjects = np.array(["a"] * 200 + ["b"] * 5)
    index = np.arange(len(subjects))
    combos, owners = group_combinations(subjects, index, 3, max_per_group=50, seed=0)
    drawn = combos[owners == "a"]
    assert len(drawn) == 50 and len({tuple(c) for c in drawn}) == 50   # C(200, 3) is 1.3M: drawn
    assert all(list(c) == sorted(c) and len(set(c)) == 3 and max(c) < 200 for c in drawn)
    assert (owners == "b").sum() == 10                                  # C(5, 3) listed whole
    again, _ = group_combinations(subjects, index, 3, max_per_group=50, seed=0)
    assert (again == combos).all()                                      # the same seed, the same draw


def test_metrics_from_confusion():
    m = metrics_from_confusion(np.array([[3, 1], [0, 4]]))
    assert m["accuracy"] == pytest.approx(7 / 8)
    assert m["macro_f1"] == pytest.approx(np.mean([2 * 3 / 7, 2 * 4 / 9]))


def _people_with_shared_nuisance(image_seed: int, people: int = 12, images: int = 8, dims: int = 10):
    """Small identity offsets plus a large nuisance (an "expression") along two directions that
    every person shares: per-dimension standardisation leaves the nuisance dominant. The people
    and the nuisance are fixed; image_seed draws their images."""
    fixed = np.random.default_rng(0)
    centres = fixed.standard_normal((people, dims)) * 0.5
    nuisance = fixed.standard_normal((2, dims)) * 4
    rng = np.random.default_rng(image_seed)
    groups = np.repeat(np.arange(people), images)
    shared = rng.standard_normal((len(groups), 2)) @ nuisance
    x = centres[groups] + shared + 0.2 * rng.standard_normal((len(groups), dims))
    return x, groups.astype(str)


def test_within_class_whitening_removes_shared_nuisance():
    x, groups = _people_with_shared_nuisance(1)

    def within_covariance(z):
        residual = np.concatenate([z[groups == g] - z[groups == g].mean(0) for g in np.unique(groups)])
        return residual.T @ residual / (len(z) - len(np.unique(groups)))

    exact = Standardizer.fit(x, groups, floor=0)
    assert np.allclose(within_covariance(exact(x)), np.eye(x.shape[1]), atol=1e-3)
    # the default floor leaves the tiniest directions less than unit spread, never more
    norm = Standardizer.fit(x, groups)
    assert norm.whiten is not None and np.allclose(norm.whiten, norm.whiten.T, atol=1e-5)
    z = norm(x)
    assert np.linalg.eigvalsh(within_covariance(z)).max() < 1 + 1e-3
    # stored in the bundle as a plain dict: the same mapping after the round trip
    assert np.allclose(Standardizer.from_dict(norm.to_dict())(x), z, atol=1e-5)
    assert Standardizer.fit(x).whiten is None and "whiten" not in Standardizer.fit(x).to_dict()

    # New images of the same people: nearest centroid is far better after whitening.
    test, test_groups = _people_with_shared_nuisance(2)

    def accuracy(normaliser) -> float:
        train_z, test_z = normaliser(x), normaliser(test)
        names = np.unique(groups)
        centroids = np.stack([train_z[groups == g].mean(0) for g in names])
        nearest = ((test_z[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        return float((names[nearest] == test_groups).mean())

    plain, whitened = accuracy(Standardizer.fit(x)), accuracy(norm)
    assert whitened > 0.9 and whitened > plain + 0.3, (plain, whitened)


def test_cnet_beats_plain_mean_on_synthetic_sets():
    """(a): trained with no identity labels, error to the known identity on held-out people."""
    table, truth = synthetic_table(SyntheticConfig(n_people=120, images_per_person=10, seed=0))
    data = table_to_data(table)
    cfg = TrainConfig(task="cnet", epochs=6, lr=3e-3, batch_size=32, set_size=6, steps_per_epoch=10,
                      folds=4, fold=0, patience=8)
    task = CNetTask(cfg, data, true_id_coeffs=truth["true_id_coeffs"], split="person")
    result = fit(task, cfg)
    m = result.best_metrics
    assert m["truth_error_cnet"] < 0.95 * m["truth_error_mean"], m
    assert m["loo_error_cnet"] < m["loo_error_mean"]


def test_classifiers_learn_and_resume(synthetic, tmp_path):
    table, _, data = synthetic
    cfg = TrainConfig(task="expression", epochs=3, batch_size=32, patience=10)
    task = make_classifier_task(cfg, data)
    saved = {}

    def keep(metrics, save):
        if metrics["epoch"] == 1:
            save(str(tmp_path))
            saved.update(metrics)

    full = fit(task, cfg, on_epoch=keep)
    assert full.best_metrics["accuracy"] > 0.6  # 3 classes: chance 0.33
    from facedist.training.engine import load_trainer_state

    state = load_trainer_state(str(tmp_path))
    resumed = fit(make_classifier_task(cfg, data), cfg, resume=state)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history[1]["accuracy"] == saved["accuracy"]
    bundle = load_model_bundle(str(tmp_path))
    assert bundle["labels"] == sorted(EXPRESSIONS) and bundle["task"] == "expression"


@pytest.mark.slow  # trains C-Net and three identity models
def test_recognizer_from_bundles(synthetic, tmp_path):
    table, truth, data = synthetic
    cnet_cfg = TrainConfig(task="cnet", epochs=2, steps_per_epoch=3, batch_size=16)
    cnet_task = CNetTask(cnet_cfg, data)
    cnet_fit = fit(cnet_task, cnet_cfg)
    save_model_bundle(cnet_task.bundle(cnet_fit.best_state, cnet_fit.best_metrics), str(tmp_path / "cnet"))
    id_cfg = TrainConfig(task="identity", epochs=4, batch_size=32, cnet=str(tmp_path / "cnet"), aggregate="cnet",
                         max_combos_per_subject=4)
    id_task = make_classifier_task(id_cfg, data)
    id_fit = fit(id_task, id_cfg)
    save_model_bundle(id_task.bundle(id_fit.best_state, id_fit.best_metrics), str(tmp_path / "identity"))
    recognizer = Recognizer.from_directory(str(tmp_path))
    rows = table.to_pylist()
    subject = rows[0]["subject"]
    mine = [r for r in rows if r["subject"] == subject][:4]
    bad = {"path": "x", "status": "error", "message": "corrupt file"}
    out = recognizer.predict(mine + [bad], top_k=3)
    assert out["n_used"] == 4 and out["aggregation"] == "cnet"
    assert len(out["images"]) == 5 and out["images"][4]["error"] == "corrupt file"
    assert len(out["identity"]["top_k"]) == 3 and len(out["images"][0]["confidence"]) == 40
    assert id_fit.best_metrics["accuracy"] > 1 / 60 * 5  # well above chance on 60 people
    assert np.shape(recognizer.bundles["identity"]["input_norm"]["whiten"]) == (40, 40)
    # an identity model trained on plain means is served with plain means, C-Net bundle or not
    mean_cfg = replace(id_cfg, aggregate="mean", epochs=1)
    mean_task = make_classifier_task(mean_cfg, data)
    mean_fit = fit(mean_task, mean_cfg)
    save_model_bundle(mean_task.bundle(mean_fit.best_state, mean_fit.best_metrics), str(tmp_path / "identity"))
    served = Recognizer.from_directory(str(tmp_path)).predict(mine, top_k=3)
    assert served["aggregation"] == "mean" and len(served["images"][0]["confidence"]) == 40
    expected = np.mean([r["id_coeffs"] for r in mine], axis=0)
    np.testing.assert_allclose(served["identity_coeffs"], expected, rtol=1e-5, atol=1e-5)
