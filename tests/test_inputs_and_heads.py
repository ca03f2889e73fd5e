"""Descriptor groups (--inputs), the light heads (--head linear / mlp), and the column-wise table
reader: on synthetic tables with known identities (models/ needs no cluster)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from facedist.features import Standardizer, quality_vector
from facedist.recognition import Recognizer, bundle_logits
from facedist.schema import DEFAULT_INPUTS, parse_inputs
from facedist.training import TrainConfig, save_model_bundle
from facedist.training.bundle import load_model_bundle
from facedist.training.data import table_to_data
from facedist.training.engine import fit
from facedist.training.presets import preset_config
from facedist.training.synthetic import SyntheticConfig, synthetic_table
from facedist.training.tasks import CNetTask, classifier_from_split, combo_size_for, make_classifier_task

EXPRESSIONS = ("happy", "sad", "surprised")


@pytest.fixture(scope="module")
def synthetic():
    torch.set_num_threads(1)
    table, _ = synthetic_table(SyntheticConfig(n_people=30, images_per_person=6, seed=3), expressions=EXPRESSIONS)
    return table, table_to_data(table)


def _rowwise(table: pa.Table) -> dict:
    """The reference the column-wise reader must match: every usable row converted on its own."""
    rows = [r for r in table.to_pylist() if r["status"] == "ok" and r["id_coeffs"] and r["exp_coeffs"]]
    n_exp = len(rows[0]["exp_coeffs"])
    rows = [r for r in rows if len(r["exp_coeffs"]) == n_exp]
    n_feature = max(len(r["feature"] or []) for r in rows)
    points = lambda v: (np.asarray(v, np.float32).reshape(68, 2) if v is not None and len(v) == 136  # noqa: E731
                        else np.full((68, 2), np.nan, np.float32))
    return {"id_coeffs": np.array([r["id_coeffs"] for r in rows], np.float32),
            "exp_coeffs": np.array([r["exp_coeffs"] for r in rows], np.float32),
            "quality": np.stack([quality_vector(r, n_feature) for r in rows]),
            "landmarks": np.stack([points(r["landmarks"]) for r in rows]),
            "box": np.array([r["box"] if r["box"] and len(r["box"]) == 4 else [np.nan] * 4 for r in rows], np.float32),
            "path": np.array([r["path"] for r in rows], dtype=object)}


def test_the_column_reader_matches_row_by_row_conversion_and_counts_what_it_skips(synthetic):
    table, _ = synthetic
    rows = table.to_pylist()
    rows[1] = {**rows[1], "status": "error", "message": "corrupt", "id_coeffs": None}
    rows[2] = {**rows[2], "landmarks": None, "box": None, "yaw": None, "feature": rows[2]["feature"][:5]}
    rows[3] = {**rows[3], "exp_coeffs": rows[3]["exp_coeffs"][:3]}          # another layout: not usable
    edited = pa.Table.from_pylist(rows, schema=table.schema)
    data, want = table_to_data(edited), _rowwise(edited)
    assert len(data) == len(want["path"]) == table.num_rows - 2 and data.skipped == 2
    for name in ("id_coeffs", "exp_coeffs", "quality", "landmarks", "box"):
        np.testing.assert_array_equal(getattr(data, name), want[name], err_msg=name)
    assert list(data.path) == list(want["path"])


def test_a_descriptor_is_its_groups_side_by_side_and_a_missing_group_says_so(synthetic):
    _, data = synthetic
    x = data.descriptor(("id", "exp"))
    np.testing.assert_array_equal(x, np.hstack([data.id_coeffs, data.exp_coeffs]))
    assert parse_inputs("id, tex") == ("id", "tex")
    for bad in ("id,id", "alpha", ""):
        with pytest.raises(ValueError):
            parse_inputs(bad)
    with pytest.raises(ValueError, match="tex_coeffs"):
        data.descriptor(("id", "tex"))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_light_heads_learn_and_their_bundles_load_strictly(synthetic, tmp_path, head):
    _, data = synthetic
    cfg = preset_config("expression", head=head, inputs=("exp",), epochs=15)
    task = make_classifier_task(cfg, data)
    result = fit(task, cfg)
    assert result.best_metrics["accuracy"] > 0.6      # 3 classes: chance 0.33
    # select="last": the validation run's last epoch; with refit its epochs again on every row
    runs = 2 if cfg.refit else 1
    assert len(result.history) == runs * cfg.epochs
    assert result.best_metrics["epoch"] == cfg.epochs - 1 and "refit" not in result.best_metrics
    assert all(h.get("refit", False) == (h["epoch"] >= cfg.epochs) for h in result.history)
    save_model_bundle(task.bundle(result.best_state, result.best_metrics), str(tmp_path))
    bundle = load_model_bundle(str(tmp_path))
    assert bundle["extra"]["inputs"] == ["exp"] and bundle["extra"]["head"] == head
    assert bundle["model_config"]["name"] == {"linear": "linear_head", "mlp": "mlp_head"}[head]


def test_a_prototype_head_names_people_seen_in_one_photo(synthetic):
    """Identity with every test person seen once: the prototype-initialised linear head is the
    nearest class mean by cosine after within-person whitening, and beats a random start."""
    _, data = synthetic
    subjects = data.subject.astype(str)
    people = sorted(set(subjects))
    test_people = set(people[::3])
    first = {p: np.flatnonzero(subjects == p)[0] for p in test_people}
    train = np.array([i for i in range(len(data)) if subjects[i] not in test_people or i == first[subjects[i]]])
    probes = np.array([i for i in range(len(data)) if subjects[i] in test_people and i != first[subjects[i]]])
    scores = {}
    for prototype in (True, False):
        cfg = preset_config("identity", head="linear", inputs=("id",), prototype_init=prototype, epochs=5, patience=5)
        task = classifier_from_split(cfg, data, train, train[:1], combo_size=1)
        state = fit(task, cfg).last_state
        model = task.build_model()
        model.load_state_dict(state)
        bundle = {**task.bundle(state, {}), "model": model.eval()}
        predicted = np.asarray(bundle["labels"])[bundle_logits(bundle, data.descriptor(("id",))[probes]).argmax(1)]
        scores[prototype] = float(np.mean(predicted == subjects[probes]))
    assert scores[True] > 0.5 and scores[True] > scores[False]   # 30 people: chance 0.03


def test_the_recognizer_reads_each_bundles_inputs(synthetic, tmp_path):
    table, data = synthetic
    cnet_cfg = TrainConfig(task="cnet", epochs=1, steps_per_epoch=2, batch_size=8)
    cnet_task = CNetTask(cnet_cfg, data)
    cnet_fit = fit(cnet_task, cnet_cfg)
    save_model_bundle(cnet_task.bundle(cnet_fit.best_state, cnet_fit.best_metrics), str(tmp_path / "cnet"))
    for task, inputs in (("identity", ("id", "feature")), ("expression", ("exp", "id"))):
        cfg = preset_config(task, head="linear", inputs=inputs, epochs=3, aggregate="mean")
        t = make_classifier_task(cfg, data)
        r = fit(t, cfg)
        save_model_bundle(t.bundle(r.best_state, r.best_metrics), str(tmp_path / task))
    recognizer = Recognizer.from_directory(str(tmp_path))
    assert recognizer.describe()["identity"]["inputs"] == ["id", "feature"]
    rows = table.to_pylist()
    mine = [r for r in rows if r["subject"] == rows[0]["subject"]][:3]
    no_exp = {**mine[0], "exp_coeffs": None}
    out = recognizer.predict(mine + [no_exp], top_k=2)
    # expression per image from [exp, id]; the image without exp_coeffs says why and has none
    expected = bundle_logits(recognizer.bundles["expression"], np.hstack(
        [np.array([r["exp_coeffs"] for r in mine]), np.array([r["id_coeffs"] for r in mine])]).astype(np.float32))
    labels = recognizer.bundles["expression"]["labels"]
    assert [out["images"][i]["expression_label"] for i in range(3)] == [labels[j] for j in expected.argmax(1)]
    assert "expression_label" not in out["images"][3] and "exp_coeffs" in out["images"][3]["error"]
    # identity from the mean of [id, feature] over all four (the fourth has both groups)
    n_feature = recognizer.bundles["identity"]["extra"]["input_dims"][1]
    x = np.array([np.concatenate([r["id_coeffs"], np.pad(r["feature"][:n_feature], (0, 0))]) for r in mine + [no_exp]],
                 np.float32)
    probs = bundle_logits(recognizer.bundles["identity"], x.mean(0, keepdims=True))[0]
    assert out["identity"]["top_k"][0]["label"] == recognizer.bundles["identity"]["labels"][int(probs.argmax())]
    # a bundle written before bundles recorded their inputs reads as the task's default
    old = load_model_bundle(str(tmp_path / "expression"))
    old["extra"] = {k: v for k, v in old["extra"].items() if k not in ("inputs", "input_dims", "head")}
    assert Recognizer({"expression": old}).inputs["expression"] == DEFAULT_INPUTS["expression"]


def test_too_few_photos_for_a_combination_gives_smaller_sets_and_says_so():
    cfg = TrainConfig(task="identity", combo_size=3, folds=3)
    size, note = combo_size_for(np.repeat(np.arange(50), 2).astype(str), cfg)    # London: 2 photos each
    assert size == 1 and "single images" in note
    assert combo_size_for(np.repeat(np.arange(15), 11).astype(str), cfg) == (3, None)   # Yale: 11 each


def test_cnet_with_nothing_to_validate_is_reported_as_degenerate(synthetic):
    _, data = synthetic
    # one photo per person at validation: every person's first photo only
    subjects = data.subject.astype(str)
    keep = np.array([np.flatnonzero(subjects == p)[0] for p in sorted(set(subjects))])
    single = data.subset(keep)
    cfg = TrainConfig(task="cnet", epochs=1, steps_per_epoch=1, batch_size=4)
    result = fit(CNetTask(cfg, single), cfg)
    assert result.best_metrics["degenerate"] and np.isnan(result.best_metrics["loo_gain_vs_mean"])


def test_unit_length_standardizer_round_trips():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), np.repeat(np.arange(8), 5)
    norm = Standardizer.fit(x, y, unit_length=True)
    z = norm(x)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), np.sqrt(5), rtol=1e-5)
    np.testing.assert_array_equal(Standardizer.from_dict(norm.to_dict())(x), z)
    assert not Standardizer.from_dict(replace(norm, unit_length=False).to_dict()).unit_length


def test_refit_ships_the_recipe_trained_on_every_row_and_per_group_scales_each_group(synthetic):
    """refit: the bundle's weights and normalisation come from a second run on the training and
    validation rows together; its metrics stay the validation run's. per_group: each input group
    has unit total variance on the rows it was fitted on, whatever its width."""
    _, data = synthetic
    cfg = preset_config("expression", head="linear", inputs=("id", "exp"), epochs=6, input_norm="per_group")
    plain, refitted = (make_classifier_task(replace(cfg, refit=r), data) for r in (False, True))
    n_train, n_val = len(plain.y_train), len(plain.y_val)
    first, second = fit(plain, replace(cfg, refit=False)), fit(refitted, replace(cfg, refit=True))
    same = ("epoch", "accuracy", "val_loss", "train_loss")   # the same validation run
    assert [first.best_metrics[k] for k in same] == [second.best_metrics[k] for k in same]
    assert not all(torch.equal(first.best_state[k], second.best_state[k]) for k in first.best_state)
    assert len(refitted.y_train) == n_train + n_val and refitted.extra["refit"] is True
    assert refitted.extra["n_train_images"] == n_train + n_val
    z = refitted.x_train.double().numpy()
    widths = [data.id_coeffs.shape[1], data.exp_coeffs.shape[1]]
    for lo, hi in ((0, widths[0]), (widths[0], sum(widths))):
        assert abs(z[:, lo:hi].var(0).sum() - 1.0) < 1e-3
    with pytest.raises(ValueError, match="select='last'"):
        fit(make_classifier_task(replace(cfg, refit=True, select="best"), data), replace(cfg, refit=True, select="best"))
