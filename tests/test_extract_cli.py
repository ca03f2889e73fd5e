"""`facedist extract` on one machine: real tddfa on real faces plus bad inputs, rows in = rows out,
resume without redoing finished work, previews."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from facedist import assets, storage
from facedist.cli import main
from facedist.extractors import DEFAULT_BACKEND
from facedist.schema import FACEAPI_EXPRESSIONS, layout_from_schema
from facedist.texture import TextureBasis

FACES = ["subject01.happy", "subject02.sad", "subject03.normal", "subject04.surprised"]


@pytest.fixture
def mixed_folder(tmp_path, yale_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in FACES:
        shutil.copy(yale_dir / name, folder / name)
    jpeg = io.BytesIO()
    Image.open(yale_dir / FACES[0]).convert("RGB").save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("this is not an image\n")
    noise = (np.random.default_rng(0).random((240, 320)) * 60 + 100).astype(np.uint8)
    Image.fromarray(noise).save(folder / "wall.png")
    return folder


def _table(out):
    return storage.read_table(str(out)).to_pandas().set_index("path")


@pytest.mark.slow  # extraction runs with every model
def test_extract_mixed_folder_then_resume(mixed_folder, tmp_path, capsys):
    out = tmp_path / "coeffs"
    assert main(["extract", str(mixed_folder), "--out", str(out), "--backend", "tddfa",
                 "--batch-size", "4", "--preview", "2"]) == 0
    table = _table(out)
    assert len(table) == 9  # rows in = rows out
    status = {p.rsplit("/", 1)[-1]: s for p, s in table["status"].items()}
    message = {p.rsplit("/", 1)[-1]: m for p, m in table["message"].items()}
    assert all(status[n] == "ok" for n in FACES)
    assert status["wall.png"] == "no_face"
    for bad in ("truncated.jpg", "corrupt.png", "empty.jpg", "notes.txt"):
        assert status[bad] == "error", bad
        assert message[bad], bad
    assert "empty" in message["empty.jpg"].lower() or "0 bytes" in message["empty.jpg"]
    assert "text" in message["notes.txt"].lower()
    ok = table[table.status == "ok"]
    assert ok["id_coeffs"].map(len).eq(40).all() and ok["exp_coeffs"].map(len).eq(10).all()
    assert ok["feature"].map(len).eq(512).all() and ok["landmarks"].map(len).eq(136).all()
    assert (ok["landmark_error"] < 0.15).all()
    embeddings = np.stack(ok["face_embedding"])  # dlib's face descriptor, on by default
    assert embeddings.shape == (4, 128)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert table[table.status != "ok"]["face_embedding"].isna().all()
    _assert_face_attributes(table)
    assert set(ok["subject"]) == {"subject01", "subject02", "subject03", "subject04"}
    assert len(storage.list_files(str(out / "previews"))) == 2
    assert "ok 4, no_face 1, error 4" in capsys.readouterr().out

    # A new image appears and one finished image changes: only those two are processed again.
    shutil.copy(mixed_folder / FACES[0], mixed_folder / "subject01.copy")
    img = Image.open(mixed_folder / FACES[1]).convert("L")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(mixed_folder / FACES[1], "GIF")
    assert main(["extract", str(mixed_folder), "--out", str(out), "--backend", "tddfa"]) == 0
    assert "wrote 2 and skipped 8" in capsys.readouterr().out
    summary = storage.read_bytes(str(out / "_summary.json"))
    assert b'"rows": 11' in summary


@pytest.mark.slow  # extraction runs with every model
def test_rerun_with_other_settings_is_refused_then_replaced(tmp_path, yale_dir, capsys):
    """An output keeps one set of extraction settings: a rerun with another backend or detector
    fails before any work and leaves the rows alone; --no-resume replaces them."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in FACES[:2]:
        shutil.copy(yale_dir / name, folder / name)
    out = tmp_path / "coeffs"
    assert main(["extract", str(folder), "--out", str(out)]) == 0
    before = _table(out)
    assert set(before["backend"]) == {DEFAULT_BACKEND}
    capsys.readouterr()

    for flags, differs in ((["--backend", "fit"], "backend"), (["--detector", "dlib"], "detector")):
        assert main(["extract", str(folder), "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert differs in err and "--no-resume" in err, err
        after = _table(out)
        assert len(after) == len(before) and set(after["backend"]) == {DEFAULT_BACKEND}
        np.testing.assert_array_equal(np.stack(after["id_coeffs"]), np.stack(before["id_coeffs"]))

    # A --no-resume run that fails (deep3d without its user-supplied checkpoint) loses no rows:
    # they are set aside under _replaced/, out of the table, and the output holds no mix.
    assert main(["extract", str(folder), "--out", str(out), "--backend", "deep3d", "--no-resume"]) == 2
    assert "epoch_20.pth" in capsys.readouterr().err
    aside = [p for p in storage.list_files(str(out / "_replaced")) if p.endswith(".parquet")]
    assert len(aside) == 1 and storage.read_table(aside[0]).num_rows == len(before)
    assert not [p for p in storage.list_files(str(out), recursive=False) if p.endswith(".parquet")]

    assert main(["extract", str(folder), "--out", str(out), "--backend", "fit", "--no-resume"]) == 0
    assert not storage.exists(str(out / "_replaced"))  # the set-aside rows go once replaced
    replaced = _table(out)
    assert len(replaced) == 2 and set(replaced["backend"]) == {"fit"}  # replaced, not mixed
    assert "wrote 2 and skipped 0" in capsys.readouterr().out


def test_a_landmark_choice_the_backend_cannot_take_fails_before_work(tmp_path, yale_dir, capsys):
    out = tmp_path / "coeffs"
    assert main(["extract", str(yale_dir), "--out", str(out), "--backend", "tddfa", "--landmarks", "dlib"]) == 2
    assert "own regression" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # extraction runs with every model
def test_default_extraction_fills_tex_coeffs_and_none_leaves_them_out(tmp_path, yale_dir, capsys):
    """With no flag the shipped basis fills tex_coeffs in every ok row; an output made so refuses a
    resume with --texture-basis none; --texture-basis none keeps the sampled texture only."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in FACES:
        shutil.copy(yale_dir / name, folder / name)
    out = tmp_path / "default"
    assert main(["extract", str(folder), "--out", str(out)]) == 0
    table = storage.read_table(str(out))
    basis = TextureBasis.load(str(assets.resolve(assets.DEFAULT_TEXTURE_BASIS_FILE)))
    layout = layout_from_schema(table.schema)
    assert layout.texture.endswith("+" + basis.version) and layout.n_tex == basis.n_components
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert len(ok) == len(FACES)
    tex_coeffs = np.array([r["tex_coeffs"] for r in ok], np.float64)  # every ok row has them
    assert tex_coeffs.shape == (len(FACES), basis.n_components) and np.isfinite(tex_coeffs).all()
    capsys.readouterr()

    assert main(["extract", str(folder), "--out", str(out), "--texture-basis", "none"]) == 2
    err = capsys.readouterr().err
    assert "texture:" in err and basis.version in err and "--no-resume" in err, err
    assert storage.read_table(str(out)).num_rows == len(FACES)

    plain = tmp_path / "none"
    assert main(["extract", str(folder), "--out", str(plain), "--texture-basis", "none"]) == 0
    rows = [r for r in storage.read_table(str(plain)).to_pylist() if r["status"] == "ok"]
    assert len(rows) == len(FACES)
    assert all(r["tex_coeffs"] is None and len(r["texture"]) == 4 * layout.n_texture_vertices for r in rows)


def _assert_face_attributes(table):
    """face-api's outputs (on by default) fill every ok row and no other."""
    ok = table[table.status == "ok"]
    assert len(ok) and np.stack(ok["expression_feature"]).shape == (len(ok), 256)
    probs = np.stack(ok["expression_probs"])
    assert probs.shape == (len(ok), len(FACEAPI_EXPRESSIONS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert ok["faceapi_age"].between(1, 100).all() and ok["faceapi_gender_male"].between(0, 1).all()
    rest = table[table.status != "ok"]
    assert rest[["expression_feature", "expression_probs", "faceapi_age", "faceapi_gender_male"]].isna().all().all()


def _drop_columns(part, layout_key, columns):
    """Rewrite a part as facedist wrote it before these columns existed: no columns, no layout key."""
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(part)
    meta = dict(table.schema.metadata)
    layout = json.loads(meta[b"facedist.layout"])
    del layout[layout_key]
    meta[b"facedist.layout"] = json.dumps(layout, sort_keys=True).encode()
    table = table.drop_columns(list(columns))
    pq.write_table(table.replace_schema_metadata(meta), part)


def _drop_face_embedding(part):
    _drop_columns(part, "face_embedding", ["face_embedding"])


@pytest.mark.slow  # extraction runs with every model
def test_face_embedding_is_part_of_the_settings_and_old_tables_still_read(tmp_path, yale_dir, capsys):
    """--no-face-embedding leaves the column null; an output made with embeddings refuses a run
    without (and the other way round); a table written before the column existed reads, trains,
    and resumes with --no-face-embedding."""
    from facedist.training.data import load_data

    folder = tmp_path / "images"
    folder.mkdir()
    for name in FACES[:2]:
        shutil.copy(yale_dir / name, folder / name)
    out = tmp_path / "coeffs"
    assert main(["extract", str(folder), "--out", str(out), "--backend", "tddfa", "--no-face-embedding"]) == 0
    table = _table(out)
    assert (table.status == "ok").all() and table["face_embedding"].isna().all()
    capsys.readouterr()
    assert main(["extract", str(folder), "--out", str(out), "--backend", "tddfa"]) == 2
    err = capsys.readouterr().err
    assert "face_embedding" in err and "--no-resume" in err, err

    parts = [p for p in storage.list_files(str(out)) if p.endswith(".parquet")]
    for part in parts:
        _drop_face_embedding(part)
    assert "face_embedding" not in storage.read_table(str(out)).column_names
    assert len(load_data(str(out))) == 2
    assert main(["extract", str(folder), "--out", str(out), "--backend", "tddfa", "--no-face-embedding"]) == 0
    assert "wrote 0 and skipped 2" in capsys.readouterr().out
    assert main(["extract", str(folder), "--out", str(out), "--backend", "tddfa"]) == 2
    assert "face_embedding" in capsys.readouterr().err


@pytest.mark.slow  # extraction runs with every model
def test_face_attributes_are_part_of_the_settings_and_old_tables_still_read(tmp_path, yale_dir, capsys):
    """Defaults fill face-api's four columns for every ok row (expf is a training input group);
    --no-face-attributes leaves them null; an output made with them refuses a run without (and the
    other way round); a table written before the columns existed reads and resumes without them."""
    from facedist.training.data import load_data

    folder = tmp_path / "images"
    folder.mkdir()
    for name in FACES:
        shutil.copy(yale_dir / name, folder / name)
    out = tmp_path / "default"
    assert main(["extract", str(folder), "--out", str(out), "--no-face-embedding"]) == 0
    table = _table(out)
    assert (table.status == "ok").all()
    _assert_face_attributes(table)
    layout = layout_from_schema(storage.read_table(str(out)).schema)
    assert layout.face_attributes.startswith("faceapi_expression:")
    data = load_data(str(out))
    assert data.group("expf").shape == (len(FACES), 256) and "expf" in data.available_inputs()
    capsys.readouterr()
    assert main(["extract", str(folder), "--out", str(out), "--no-face-embedding", "--no-face-attributes"]) == 2
    err = capsys.readouterr().err
    assert "face_attributes" in err and "--no-resume" in err, err

    plain = tmp_path / "plain"
    flags = ["--backend", "tddfa", "--no-face-embedding"]
    assert main(["extract", str(folder), "--out", str(plain), *flags, "--no-face-attributes"]) == 0
    table = _table(plain)
    assert (table.status == "ok").all()
    assert table[["expression_feature", "expression_probs", "faceapi_age", "faceapi_gender_male"]].isna().all().all()
    assert layout_from_schema(storage.read_table(str(plain)).schema).face_attributes == ""
    capsys.readouterr()
    assert main(["extract", str(folder), "--out", str(plain), *flags]) == 2
    assert "face_attributes" in capsys.readouterr().err

    for part in [p for p in storage.list_files(str(plain)) if p.endswith(".parquet")]:
        _drop_columns(part, "face_attributes", ["expression_feature", "expression_probs", "faceapi_age", "faceapi_gender_male"])
    assert "expression_feature" not in storage.read_table(str(plain)).column_names
    old = load_data(str(plain))
    assert len(old) == len(FACES) and old.group("expf") is None
    assert main(["extract", str(folder), "--out", str(plain), *flags, "--no-face-attributes"]) == 0
    assert f"wrote 0 and skipped {len(FACES)}" in capsys.readouterr().out
    assert main(["extract", str(folder), "--out", str(plain), *flags]) == 2
    assert "face_attributes" in capsys.readouterr().err
