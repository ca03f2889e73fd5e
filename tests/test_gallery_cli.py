"""`facedist train --task embedding`, `facedist gallery ...` and `facedist predict --gallery`, end to
end: real Yale photos and descriptors, real bundles, a real local Ray (bulk enrolment), real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facedist import storage
from facedist.extraction.config import ExtractConfig

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SUBJECTS = ("subject01", "subject02", "subject03", "subject04", "subject05")
CONDITIONS = ("normal", "happy", "sad", "surprised")
EXTRACT = dict(backend="tddfa", texture=False, face_attributes=False)
EXTRACT_FLAGS = ["--backend", "tddfa", "--no-texture", "--no-face-attributes"]


@pytest.fixture(scope="module")
def table(yale_dir, tmp_path_factory) -> Path:
    """20 Yale rows (5 people x 4 expressions) with dlib's descriptor, as `facedist extract` writes them."""
    from facedist.datasets import parse_yale_name
    from facedist.images import decode_image
    from facedist.extraction.rows import extract_rows
    from facedist.schema import rows_to_table

    extractor = ExtractConfig(**EXTRACT).build_extractor()
    rows = []
    for subject in SUBJECTS:
        for condition in CONDITIONS:
            path = yale_dir / f"{subject}.{condition}"
            labels = parse_yale_name(path.name)
            rows.append({"path": str(path), "content_hash": path.name, "subject": labels["subject"],
                         "expression": labels["expression"], "gender": "female" if subject in SUBJECTS[1::2]
                         else "male", "image": decode_image(path.read_bytes())})
    finished, _ = extract_rows(rows, extractor)
    assert all(r["status"] == "ok" and r["face_embedding"] is not None for r in finished)
    out = tmp_path_factory.mktemp("table")
    storage.write_table(rows_to_table(finished, extractor.layout), str(out / "part-a-00000.parquet"))
    return out


def _run(capsys, *argv) -> tuple[int, str]:
    from facedist.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def test_embedding_bundle_bulk_enrol_predict_delete_and_one_person(local_ray, table, yale_dir, tmp_path, capsys):
    from facedist.gallery.embedding import EmbeddingModel
    from facedist.training import TrainConfig, train_and_save
    from facedist.training.data import load_data

    models, gallery = tmp_path / "models", tmp_path / "gallery"
    code, out = _run(capsys, "train", "--task", "embedding", "--data", table, "--output", models)
    assert code == 0 and "threshold" in out, out
    model = EmbeddingModel.load(str(models))
    assert model.kind == "descriptor" and model.inputs == ("emb",) and -1 < model.threshold < 1
    # A small gender model: `facedist predict` needs a classifier beside the embedding.
    train_and_save(TrainConfig(task="gender", epochs=2, batch_size=16), load_data(str(table)), str(models / "gender"))

    code, out = _run(capsys, "gallery", "enroll", "--models", models, "--gallery", gallery, table, "--json")
    assert code == 0
    summary = json.loads(out[out.index("{"):])
    assert (summary["people"], summary["photos"], summary["left_out"]) == (5, 20, 0)
    code, out = _run(capsys, "gallery", "list", "--gallery", gallery, "--json")
    assert json.loads(out)["by_person"] == {s: 4 for s in SUBJECTS}

    predicted = tmp_path / "predicted"
    code, _ = _run(capsys, "predict", table, "--models", models, "--gallery", gallery, "--out", predicted,
                   "--actors", "1")
    assert code == 0
    rows = storage.read_table(str(predicted)).to_pylist()
    assert len(rows) == 20
    for row in rows:  # every photo is enrolled: its own person is the best match, or none passes the cut-off
        assert row["gallery_identity"] in (Path(row["path"]).name.split(".")[0], "unknown")
        assert row["gallery_score"] is not None
    assert any(row["gallery_identity"] != "unknown" for row in rows)

    code, out = _run(capsys, "gallery", "delete", "--gallery", gallery, "--person", "subject01")
    assert code == 0 and "removed subject01: 4 photo(s)" in out, out
    code, out = _run(capsys, "gallery", "delete", "--gallery", gallery, "--person", "subject01")
    assert code == 1 and "nothing removed" in out

    # One person from image files: enrol two photos, identify a third.
    code, out = _run(capsys, "gallery", "enroll", "--models", models, "--gallery", gallery, "--person", "newcomer",
                     *EXTRACT_FLAGS, yale_dir / "subject06.happy", yale_dir / "subject06.normal")
    assert code == 0 and "enrolled newcomer: 2 photo(s)" in out, out
    code, out = _run(capsys, "gallery", "identify", "--models", models, "--gallery", gallery, *EXTRACT_FLAGS,
                     yale_dir / "subject06.sad", "--json")
    answer = json.loads(out[out.index("{"):])
    assert answer["top_k"][0]["person"] == "newcomer"
    assert "subject01" not in [m["person"] for m in answer["top_k"]]
    code, out = _run(capsys, "gallery", "verify", "--models", models, *EXTRACT_FLAGS, "--json",
                     "--a", yale_dir / "subject06.sad", "--b", yale_dir / "subject06.wink")
    assert code == 0 and set(json.loads(out[out.index("{"):])) >= {"same", "score", "threshold"}
