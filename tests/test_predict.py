"""`facedist predict`, end to end: real 3DDFA_V2 coefficients of Yale faces, real bundles trained
on them, a real local Ray (Data, actor pools), real Parquet files.

The answers are checked against Recognizer.predict on the same rows: the one copy of the
decision logic, which /v1/predict also answers with (tests/test_serve.py checks that side).
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from facedist import storage
from facedist.extraction.config import ExtractConfig
from facedist.extraction.output import list_parts

SUBJECTS = ("subject01", "subject02", "subject03", "subject04", "subject05")
CONDITIONS = ("normal", "happy", "sad", "surprised")
# Yale has no gender labels; these make a gender model to predict with (any labels would do).
GENDER = {"subject01": "male", "subject02": "female", "subject03": "male", "subject04": "female",
          "subject05": "male"}
ERROR_PATH = "/data/subject01.gone"
EXTRACT = dict(backend="tddfa", texture=False, face_embedding=False)


@pytest.fixture(scope="module")
def table(yale_dir, tmp_path_factory) -> Path:
    """20 Yale rows (5 people x 4 expressions) + one error row, in two Parquet parts with the
    layout, as `facedist extract` writes them."""
    from facedist.datasets import parse_yale_name
    from facedist.images import decode_image
    from facedist.extraction.rows import extract_rows
    from facedist.schema import STATUS_ERROR, rows_to_table

    extractor = ExtractConfig(**EXTRACT).build_extractor()
    rows = []
    for subject in SUBJECTS:
        for condition in CONDITIONS:
            path = yale_dir / f"{subject}.{condition}"
            labels = parse_yale_name(path.name)
            rows.append({"path": str(path), "content_hash": path.name, "subject": labels["subject"],
                         "expression": labels["expression"], "gender": GENDER[subject],
                         "image": decode_image(path.read_bytes())})
    finished, _ = extract_rows(rows, extractor)
    assert all(r["status"] == "ok" for r in finished)
    finished.append({"path": ERROR_PATH, "content_hash": None, "status": STATUS_ERROR, "subject": "subject01",
                     "message": "could not read /data/subject01.gone: no such file"})
    out = tmp_path_factory.mktemp("table")
    storage.write_table(rows_to_table(finished[:11], extractor.layout), str(out / "part-a-00000.parquet"))
    storage.write_table(rows_to_table(finished[11:], extractor.layout), str(out / "part-a-00001.parquet"))
    return out


@pytest.fixture(scope="module")
def models(table, tmp_path_factory) -> str:
    """Small C-Net, identity (C-Net aggregate), gender and expression bundles trained on the table."""
    import torch

    from facedist.training import TrainConfig, train_and_save
    from facedist.training.data import load_data

    torch.manual_seed(0)
    data = load_data(str(table))
    out = tmp_path_factory.mktemp("models")
    for cfg in (TrainConfig(task="cnet", epochs=2, steps_per_epoch=2, batch_size=8),
                TrainConfig(task="identity", epochs=3, batch_size=16, cnet=str(out / "cnet"), aggregate="cnet",
                            max_combos_per_subject=8),
                TrainConfig(task="gender", epochs=2, batch_size=16),
                TrainConfig(task="expression", epochs=2, batch_size=16)):
        train_and_save(cfg, data, str(out / cfg.task))
    return str(out)


def _table_rows(uri) -> list[dict]:
    return storage.read_table(str(uri)).to_pylist()


def _predictions(uri) -> list[dict]:
    """The output read back with pyarrow (not through the code under test)."""
    parts = list_parts(str(uri))
    assert parts
    return pq.ParquetDataset(parts).read().to_pylist()


def _assert_same_as_recognizer(recognizer, source: dict, got: dict, top_k: int) -> None:
    expected = recognizer.predict([source], top_k)
    image = expected["images"][0]
    if not image["ok"]:
        assert got["status"] != "ok" and got["identity"] is None and got["expression"] is None
        return
    ranked = expected["identity"]["top_k"]
    assert got["status"] == "ok" and got["identity"] == ranked[0]["label"]
    assert [e["label"] for e in got["identity_top_k"]] == [e["label"] for e in ranked]
    np.testing.assert_allclose([e["score"] for e in got["identity_top_k"]], [e["score"] for e in ranked], atol=1e-5)
    assert got["identity_score"] == got["identity_top_k"][0]["score"]
    assert got["gender"] == expected["gender"]["label"]
    np.testing.assert_allclose(got["gender_score"], expected["gender"]["scores"][got["gender"]], atol=1e-5)
    assert got["expression"] == image["expression_label"]
    np.testing.assert_allclose(got["expression_score"], image["expression"][got["expression"]], atol=1e-5)


# ---- no Ray ----------------------------------------------------------------------------------

def test_predict_many_is_predict_per_person(table, models):
    """The batched method answers each person exactly as predict() on that person alone,
    including people with an error row and a row a model cannot read."""
    from facedist.recognition import Recognizer

    recognizer = Recognizer.from_directory(models)
    rows = _table_rows(table)
    no_exp = {**rows[5], "exp_coeffs": None}
    people = [rows[0:4], rows[4:8] + [rows[-1]], [rows[8]], [rows[-1]], [no_exp, rows[9]], []]
    many = recognizer.predict_many(people, top_k=3)
    assert len(many) == len(people)
    for person, answer in zip(people, many):
        alone = recognizer.predict(person, top_k=3)
        assert answer.keys() == alone.keys() and answer["n_used"] == alone["n_used"]
        assert [(i["ok"], i["error"], i.get("expression_label")) for i in answer["images"]] == \
               [(i["ok"], i["error"], i.get("expression_label")) for i in alone["images"]]
        if alone["identity"] is None:
            assert answer["identity"] is None
            continue
        assert [e["label"] for e in answer["identity"]["top_k"]] == [e["label"] for e in alone["identity"]["top_k"]]
        np.testing.assert_allclose(answer["identity_coeffs"], alone["identity_coeffs"], atol=1e-5)
        assert answer["gender"]["label"] == alone["gender"]["label"]
    assert many[3]["images"][0]["error"].startswith("could not read") and many[3]["n_used"] == 0
    # Read by the identity model (so usable), but the expression model could not: it says why.
    assert "exp_coeffs" in many[4]["images"][0]["error"] and "expression_label" not in many[4]["images"][0]


def test_table_detection(table, tmp_path, yale_dir):
    from facedist.prediction.rows import table_parts

    assert table_parts(str(table)) == list_parts(str(table))
    assert table_parts(str(table / "part-a-00000.parquet")) == [str(table / "part-a-00000.parquet")]
    assert table_parts(str(yale_dir)) is None  # images
    manifest = tmp_path / "manifest.parquet"
    import pyarrow as pa
    pq.write_table(pa.table({"path": [str(yale_dir / "subject01.normal")]}), manifest)
    assert table_parts(str(manifest)) is None  # a manifest of images, not coefficients


# ---- on a local Ray ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_predict_table_rows_groups_and_resume(local_ray, table, models, tmp_path):
    from facedist.prediction.rows import PredictConfig, PredictionSettingsError
    from facedist.prediction.distributed import run_ray_prediction
    from facedist.recognition import Recognizer

    out = tmp_path / "predictions"
    config = PredictConfig(models=models, top_k=3, group_by="subject", batch_size=8, actors=2, progress=False)
    summary = run_ray_prediction(str(table), str(out), config)
    source = {r["path"]: r for r in _table_rows(table)}
    got = _predictions(out)
    # Rows in = rows out, one per path.
    assert len(got) == len(source) == 21 and {r["path"] for r in got} == set(source)
    assert summary["rows"] == 21 and summary["run"]["written"] == 21 and summary["run"]["unaccounted"] == 0
    assert summary["counts"] == {"ok": 20, "no_face": 0, "error": 1}
    error = next(r for r in got if r["path"] == ERROR_PATH)
    assert error["status"] == "error" and error["message"] == source[ERROR_PATH]["message"]
    assert error["identity"] is None and error["expression"] is None
    # Each row is Recognizer.predict of that row alone.
    recognizer = Recognizer.from_directory(models)
    for row in got:
        _assert_same_as_recognizer(recognizer, source[row["path"]], row, top_k=3)
    # One identity per subject, on every row of it: Recognizer.predict over the subject's rows.
    by_subject = defaultdict(list)
    for row in source.values():
        by_subject[row["subject"]].append(row)
    assert summary["run"]["groups"] == len(SUBJECTS)
    for row in got:
        expected = recognizer.predict(by_subject[source[row["path"]]["subject"]], top_k=3)["identity"]["top_k"][0]
        assert row["group"] == source[row["path"]]["subject"]
        assert row["group_identity"] == expected["label"]
        np.testing.assert_allclose(row["group_identity_score"], expected["score"], atol=1e-5)

    # Resume: nothing new, the parts untouched, and no actor started for it.
    def actors_started() -> int:  # the prediction's actors Ray has started so far, live or dead
        return sum(any(name in actor["ActorClassName"] for name in ("PredictActor", "GroupActor"))
                   for actor in local_ray._private.state.actors().values())

    before = {p: Path(p).stat().st_mtime_ns for p in list_parts(str(out))}
    started = actors_started()
    assert started >= 2                                      # the first run's group and row pools
    again = run_ray_prediction(str(table), str(out), config)
    assert again["run"]["written"] == 0 and again["run"]["skipped"] == 21 and again["rows"] == 21
    assert {p: Path(p).stat().st_mtime_ns for p in list_parts(str(out))} == before
    assert actors_started() == started
    # Other settings are refused before any work; --no-resume replaces the rows.
    with pytest.raises(PredictionSettingsError, match="top_k"):
        run_ray_prediction(str(table), str(out), PredictConfig(models=models, top_k=2, group_by="subject",
                                                               progress=False))
    replaced = run_ray_prediction(str(table), str(out), PredictConfig(models=models, top_k=2, resume=False,
                                                                      progress=False, actors=1))
    got = _predictions(out)
    assert replaced["rows"] == len(got) == 21 and all(r["group"] is None for r in got)
    assert all(len(r["identity_top_k"]) == 2 for r in got if r["status"] == "ok")


@pytest.mark.slow
@pytest.mark.ray
def test_predict_images_with_a_corrupt_file(local_ray, yale_dir, models, tmp_path):
    """An image folder: extraction (into OUT/_coefficients) then prediction, through the CLI; a
    corrupt file keeps its error, the others are Recognizer.predict of their coefficients."""
    from facedist.cli import main
    from facedist.recognition import Recognizer

    images = tmp_path / "images"
    images.mkdir()
    for name in ("subject01.wink", "subject02.sleepy", "subject03.glasses"):
        shutil.copy(yale_dir / name, images / name)
    (images / "subject04.broken").write_bytes((yale_dir / "subject04.normal").read_bytes()[:300])
    out = tmp_path / "out"
    assert main(["predict", str(images), "--models", models, "--out", str(out), "--actors", "1",
                 "--backend", "tddfa", "--no-texture", "--no-face-embedding", "--group-by", "subject"]) == 0
    got = {Path(r["path"]).name: r for r in _predictions(out)}
    assert set(got) == {"subject01.wink", "subject02.sleepy", "subject03.glasses", "subject04.broken"}
    broken = got["subject04.broken"]
    assert broken["status"] == "error" and broken["message"] and broken["identity"] is None
    coefficients = {Path(r["path"]).name: r for r in _table_rows(out / "_coefficients")}
    recognizer = Recognizer.from_directory(models)
    for name, row in got.items():
        _assert_same_as_recognizer(recognizer, coefficients[name], row, top_k=5)
        assert row["group"] == name.split(".")[0]  # Yale names give the subject
