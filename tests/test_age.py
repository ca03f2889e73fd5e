"""Age as an output: the labelled age beside face-api's estimate (schema 2), tables of schema 1
still reading, the age task (a ridge, split by person) beating the mean age, and its estimate with
its expected error in a prediction row and a /v1/predict answer."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from facedist import storage
from facedist.schema import (METADATA_SCHEMA_KEY, CoefficientLayout, layout_from_schema, rows_to_table,
                             schema_with_layout)
from facedist.training.data import load_data

LAYOUT = CoefficientLayout(backend="tddfa", n_id=8, n_exp=4)


def _table_rows(people: int = 60, photos: int = 2, seed: int = 0) -> list[dict]:
    """People with an age (18-70); each photo's face_embedding carries the age in a few directions
    among noise, face-api's estimate is the age off by a person's bias, and α is noise."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(3, 16))
    rows = []
    for p in range(people):
        age = float(rng.uniform(18, 70))
        bias = rng.normal(0, 6)
        for k in range(photos):
            z = (age - 44) / 15
            emb = z * direction[0] + 0.3 * rng.normal(size=16)
            rows.append({"path": f"p{p}_{k}.jpg", "status": "ok", "subject": f"S{p:03d}",
                         "expression": "neutral" if k == 0 else "happy", "age": age,
                         "id_coeffs": rng.normal(size=8).tolist(), "exp_coeffs": rng.normal(size=4).tolist(),
                         "face_embedding": emb.tolist(), "faceapi_age": age + bias + rng.normal(0, 2),
                         "faceapi_gender_male": 0.5})
    return rows


def _write(rows: list[dict], path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows, LAYOUT), str(path / "part-0.parquet"))
    return str(path)


def test_a_schema_1_table_reads_with_the_new_names_and_no_age_label(tmp_path):
    """Version 1 kept face-api's age in `age` and its P(male) in `gender_male`: read, they are
    faceapi_age and faceapi_gender_male, and the table has no labelled age."""
    rows = _table_rows(people=3)
    table = rows_to_table(rows, LAYOUT).drop_columns(["age"])
    table = table.rename_columns([{"faceapi_age": "age", "faceapi_gender_male": "gender_male"}.get(n, n)
                                  for n in table.column_names])
    meta = dict(schema_with_layout(LAYOUT).metadata)
    meta[METADATA_SCHEMA_KEY] = b"1"
    (tmp_path / "old").mkdir()
    pq.write_table(table.replace_schema_metadata(meta), str(tmp_path / "old" / "part-0.parquet"))

    read = storage.read_table(str(tmp_path / "old"))
    assert "faceapi_age" in read.column_names and "faceapi_gender_male" in read.column_names
    assert "age" not in read.column_names and "gender_male" not in read.column_names
    assert layout_from_schema(read.schema) == LAYOUT   # the renamed table keeps its layout
    assert read.column("faceapi_age").to_pylist() == pytest.approx([r["faceapi_age"] for r in rows])
    # Asked for by name: the old `age` is face-api's, never the label.
    picked = storage.read_table(str(tmp_path / "old"), columns=["age", "faceapi_age", "subject"])
    assert picked.column_names == ["faceapi_age", "subject"]
    data = load_data(str(tmp_path / "old"))
    assert data.age is None and data.group("fage")[:, 0] == pytest.approx([r["faceapi_age"] for r in rows])

    from facedist.prediction.rows import table_layout

    names, _ = table_layout([str(tmp_path / "old" / "part-0.parquet")])
    assert "faceapi_age" in names and "age" not in names

    # A table of this version keeps its label `age` as the label.
    new = load_data(_write(rows, tmp_path / "new"))
    assert new.age == pytest.approx([r["age"] for r in rows])
    assert new.group("fage")[:, 0] == pytest.approx([r["faceapi_age"] for r in rows])


def test_a_manifest_age_column_becomes_the_label(tmp_path):
    from facedist.datasets import records_from_manifest

    (tmp_path / "labels.csv").write_text("path,subject,gender,age\na.jpg,S1,female,24\nb.jpg,S2,male,NA\n")
    records = records_from_manifest(str(tmp_path / "labels.csv"))
    assert [r.age for r in records] == [24.0, None]
    (tmp_path / "bad.csv").write_text("path,age\na.jpg,young\n")
    with pytest.raises(ValueError, match="not a number of years"):
        records_from_manifest(str(tmp_path / "bad.csv"))


@pytest.fixture(scope="module")
def age_bundle(tmp_path_factory):
    """The shipped age preset (e + face-api's age, a ridge) on the synthetic table's fold 0."""
    from facedist.training.bundle import load_model_bundle, save_model_bundle
    from facedist.training.engine import fit
    from facedist.training.presets import preset_config
    from facedist.training.tasks import make_classifier_task

    root = tmp_path_factory.mktemp("age")
    uri = _write(_table_rows(), root / "table")
    config = preset_config("age", data=uri, folds=5, fold=0, inputs=("emb", "fage"))
    task = make_classifier_task(config, load_data(uri))
    result = fit(task, config)
    save_model_bundle(task.bundle(result.best_state, result.best_metrics), str(root / "models" / "age"))
    return load_model_bundle(str(root / "models" / "age")), result, task, str(root / "models")


def test_the_age_task_beats_the_mean_age_on_people_it_never_saw(age_bundle):
    bundle, result, task, _ = age_bundle
    m = result.best_metrics
    # The mean age is off by about 13 years on ages 18-70; the embedding holds the age to within ~5.
    assert m["mae"] < 0.5 * m["mae_baseline"], m
    assert bundle["task"] == "age" and bundle["metrics"]["mae"] == pytest.approx(m["mae"])
    # Split by person: no validation person is among the training people.
    assert task.extra["split"] == "person" and task.extra["refit"] is True
    assert bundle["extra"]["inputs"] == ["emb", "fage"] and bundle["extra"]["input_dims"] == [16, 1]


def test_a_prediction_row_and_a_predict_answer_carry_age_and_its_error(age_bundle, tmp_path):
    from facedist.prediction.rows import predict_rows
    from facedist.recognition import Recognizer
    from facedist.schema import predictions_to_table
    from facedist.serving.schemas import PredictResponse, Upload, prediction_response

    bundle, _, _, models = age_bundle
    recognizer = Recognizer.from_directory(models)
    rows = sorted(_table_rows(people=40, seed=3), key=lambda r: r["age"])
    young, old = rows[0], rows[-1]
    out = predict_rows(recognizer, [young, old, {**old, "faceapi_age": None}])
    assert out[0]["age"] < out[1]["age"]
    assert abs(out[1]["age"] - old["age"]) < abs(np.mean([r["age"] for r in rows]) - old["age"])
    assert out[0]["age_mae"] == out[1]["age_mae"] == pytest.approx(bundle["metrics"]["mae"])
    assert out[2]["status"] == "error" and out[2].get("age") is None and "faceapi_age" in out[2]["message"]
    table = predictions_to_table(out, {})
    assert table.column("age").to_pylist()[:2] == pytest.approx([out[0]["age"], out[1]["age"]])

    answer = recognizer.predict([young, {**young, "path": "again.jpg"}])
    body = prediction_response(answer, [young, young], [Upload(0, "a.jpg", b""), Upload(1, "b.jpg", b"")])
    parsed = PredictResponse(**body)
    assert parsed.age == pytest.approx(out[0]["age"], abs=1e-4) and parsed.age_mae == pytest.approx(out[0]["age_mae"])
