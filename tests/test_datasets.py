"""Label parsers on files named the way the real datasets name them (touched in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facedist import storage
from facedist.datasets import (
    ImageRecord,
    load_fei_gender_lists,
    parse_fei_name,
    parse_kdef_name,
    parse_yale_name,
    records_from_fei,
    records_from_manifest,
    records_from_paths,
)
from facedist.schema import EXPRESSIONS_7, GENDERS, YALE_CONDITIONS, YALE_EXPRESSIONS


def _touch(root: Path, names: list[str]) -> list[str]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        paths.append(str(path))
    return paths


# ---- KDEF -------------------------------------------------------------------------------------

KDEF_CODES = {"AF": "fear", "AN": "angry", "DI": "disgust", "HA": "happy", "NE": "neutral",
              "SA": "sad", "SU": "surprise"}
KDEF_VIEWS = {"FL": "full_left", "HL": "half_left", "S": "straight", "HR": "half_right", "FR": "full_right"}


def test_kdef_every_expression_and_view(tmp_path):
    names = [f"{session}{sex}{num:02d}{expr}{view}.JPG"
             for session in "AB" for sex in "FM" for num in (1, 35)
             for expr in KDEF_CODES for view in KDEF_VIEWS]
    paths = _touch(tmp_path / "KDEF", [f"{n[:4]}/{n}" for n in names])  # KDEF keeps one folder per sitting
    records = records_from_paths(paths, dataset="kdef")
    assert len(records) == len(names) == 2 * 2 * 2 * 7 * 5
    for path, record in zip(paths, records):
        name = Path(path).name
        assert record.path == path
        assert record.subject == name[1:4]                      # sex + id, session not part of it
        assert record.gender == {"F": "female", "M": "male"}[name[1]]
        assert record.expression == KDEF_CODES[name[4:6]]
        assert record.view == KDEF_VIEWS[name[6:-4]]
        assert record.expression in EXPRESSIONS_7 and record.gender in GENDERS
    # Both sessions of a person are one identity.
    assert {r.subject for r in records} == {"F01", "F35", "M01", "M35"}


def test_kdef_details():
    assert parse_kdef_name("AF01ANS.JPG") == {
        "dataset": "kdef", "subject": "F01", "expression": "angry", "gender": "female",
        "view": "straight", "session": "A"}
    assert parse_kdef_name("s3://bucket/kdef/BM70SUFR.jpg")["session"] == "B"
    assert parse_kdef_name("bm70sufr.jpeg")["subject"] == "M70"  # case does not matter
    for bad in ("AF01XXS.JPG", "CF01ANS.JPG", "AF1ANS.JPG", "AF01ANXX.JPG", "AF01ANS.txt", "subject01.happy"):
        assert parse_kdef_name(bad) is None, bad


# ---- Yale -------------------------------------------------------------------------------------

def test_yale_conditions(tmp_path):
    names = [f"subject{s:02d}.{c}" for s in (1, 7, 15) for c in YALE_CONDITIONS]
    records = records_from_paths(_touch(tmp_path, names), dataset="yale")
    for name, record in zip(names, records):
        subject, condition = name.split(".")
        assert record.subject == subject
        if condition in YALE_EXPRESSIONS:
            assert (record.expression, record.view) == (condition, None)
        else:
            assert (record.expression, record.view) == (None, condition)
        assert record.gender is None


def test_yale_real_folder_all_labelled(yale_dir):
    paths = storage.list_files(str(yale_dir))
    records = records_from_paths(paths, dataset="auto", root=str(yale_dir))
    assert len(records) == len(paths) == 164
    assert len({r.subject for r in records}) == 15
    assert all(r.expression is not None or r.view is not None for r in records)
    assert sum(r.expression == "happy" for r in records) == 15


def test_yale_details():
    assert parse_yale_name("subject07.happy")["expression"] == "happy"
    assert parse_yale_name("subject07.leftlight")["view"] == "leftlight"
    assert parse_yale_name("subject07.glasses.gif")["view"] == "glasses"
    stray = parse_yale_name("subject01.gif")          # in some copies: subject known, condition not
    assert stray["subject"] == "subject01" and stray["expression"] is None and stray["view"] is None
    assert parse_yale_name("subjectA.happy") is None and parse_yale_name("happy.subject07") is None


# ---- FEI --------------------------------------------------------------------------------------

def test_fei_names_and_gender_lists(tmp_path):
    names = [f"{s}-{p:02d}.jpg" for s in (1, 2, 99, 200) for p in range(1, 15)]
    paths = _touch(tmp_path / "fei", names)
    (tmp_path / "females.txt").write_text("1\n099\n\n# comment\n")
    (tmp_path / "males.txt").write_text("2-01.jpg\n200-11.jpg\n")  # file names work too
    female_ids, male_ids = load_fei_gender_lists(str(tmp_path / "females.txt"), str(tmp_path / "males.txt"))
    assert (female_ids, male_ids) == ({"1", "99"}, {"2", "200"})
    records = records_from_fei(paths, female_ids, male_ids)
    assert len(records) == 56
    for name, record in zip(names, records):
        subject, pose = name[:-4].split("-")
        assert record.subject == subject
        assert record.view == pose
        assert record.gender == ("female" if subject in ("1", "99") else "male")
        assert record.expression == {"11": "neutral", "12": "happy"}.get(pose)


def test_fei_unknown_gender_and_non_fei_names(tmp_path):
    paths = _touch(tmp_path, ["5-11.jpg", "notes.jpg"])
    records = records_from_fei(paths, {"1"}, {"2"})
    assert records[0] == ImageRecord(paths[0], subject="5", expression="neutral", gender=None, view="11")
    assert records[1] == ImageRecord(paths[1])  # kept, just unlabelled


def test_fei_lists_found_beside_images(tmp_path):
    paths = _touch(tmp_path, ["3-12.jpg", "4-01.jpg"])
    (tmp_path / "females.txt").write_text("3\n")
    (tmp_path / "males.txt").write_text("4\n")
    records = records_from_paths(paths, dataset="fei", root=str(tmp_path))
    assert [(r.subject, r.gender, r.expression) for r in records] == [("3", "female", "happy"), ("4", "male", None)]


def test_fei_conflicting_lists(tmp_path):
    (tmp_path / "f.txt").write_text("1\n2\n")
    (tmp_path / "m.txt").write_text("2\n")
    with pytest.raises(ValueError, match=r"both female and male: \['2'\]"):
        load_fei_gender_lists(str(tmp_path / "f.txt"), str(tmp_path / "m.txt"))


def test_fei_details():
    assert parse_fei_name("12a.jpg")["expression"] == "neutral"    # frontal release
    assert parse_fei_name("12b.jpg")["expression"] == "happy"
    assert parse_fei_name("0-01.jpg") is None and parse_fei_name("201-01.jpg") is None
    assert parse_fei_name("1-15.jpg") is None and parse_fei_name("1-00.jpg") is None


# ---- auto, folder, none -----------------------------------------------------------------------

def test_auto_mixes_datasets_and_keeps_unknown(tmp_path):
    names = ["AM10HAS.JPG", "subject03.sad", "17-11.jpg", "holiday.png", "12a.jpg"]
    records = records_from_paths(_touch(tmp_path, names), dataset="auto")
    assert [r.subject for r in records] == ["M10", "subject03", "17", None, None]
    assert [r.expression for r in records] == ["happy", "sad", "neutral", None, None]
    assert records[3] == ImageRecord(str(tmp_path / "holiday.png"))


def test_folder_per_label(tmp_path):
    paths = _touch(tmp_path / "data", ["alice/1.jpg", "alice/2.png", "bob/x/3.jpg", "loose.jpg"])
    records = records_from_paths(paths, dataset="folder", root=str(tmp_path / "data"))
    assert [r.subject for r in records] == ["alice", "alice", "bob", None]
    # Without a root the parent folder is the label.
    assert records_from_paths(paths[:1], dataset="folder")[0].subject == "alice"


def test_folder_labels_on_s3_uris():
    paths = ["s3://b/faces/carol/1.jpg", "s3://b/faces/dave/2.jpg"]
    records = records_from_paths(paths, dataset="folder", root="s3://b/faces/")
    assert [r.subject for r in records] == ["carol", "dave"]


def test_none_and_unknown_dataset(tmp_path):
    paths = _touch(tmp_path, ["AF01ANS.JPG"])
    assert records_from_paths(paths, dataset="none") == [ImageRecord(paths[0])]
    with pytest.raises(ValueError, match="unknown dataset"):
        records_from_paths(paths, dataset="celeba")


# ---- manifests --------------------------------------------------------------------------------

def test_csv_manifest_relative_paths_and_labels(tmp_path):
    _touch(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,subject,expression,gender,view,extra\n"
        "imgs/a.jpg,007,Happy,F,front,x\n"
        f"{tmp_path / 'imgs' / 'b.jpg'},008,,male,,y\n"
        "s3://bucket/c.jpg,,sad,,,z\n")
    records = records_from_manifest(str(manifest))
    assert records == [
        ImageRecord(str(tmp_path / "imgs" / "a.jpg"), subject="007", expression="happy", gender="female", view="front"),
        ImageRecord(str(tmp_path / "imgs" / "b.jpg"), subject="008", expression=None, gender="male", view=None),
        ImageRecord("s3://bucket/c.jpg", subject=None, expression="sad", gender=None, view=None),
    ]


def test_parquet_manifest_only_paths(tmp_path):
    pq.write_table(pa.table({"path": ["x/1.png", "x/2.png"]}), tmp_path / "m.parquet")
    records = records_from_manifest(str(tmp_path / "m.parquet"))
    assert records == [ImageRecord(str(tmp_path / "x" / "1.png")), ImageRecord(str(tmp_path / "x" / "2.png"))]


def test_table_manifest_with_base():
    table = pa.table({"path": ["p/1.jpg"], "subject": [None], "gender": ["female"]})
    assert records_from_manifest(table) == [ImageRecord("p/1.jpg", gender="female")]
    assert records_from_manifest(table, base="s3://bkt/root")[0].path == "s3://bkt/root/p/1.jpg"


def test_manifest_on_s3(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/sets/m.csv", b"path,subject\nimgs/1.jpg,s1\n../other/2.jpg,s2\n")
    records = records_from_manifest(f"{s3_bucket}/sets/m.csv")
    assert records == [ImageRecord(f"{s3_bucket}/sets/imgs/1.jpg", subject="s1"),
                       ImageRecord(f"{s3_bucket}/other/2.jpg", subject="s2")]


def test_bad_manifests(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,subject\na.jpg,1\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        records_from_manifest(str(tmp_path / "nopath.csv"))
    (tmp_path / "gender.csv").write_text("path,gender\na.jpg,robot\n")
    with pytest.raises(ValueError, match="unknown gender 'robot'"):
        records_from_manifest(str(tmp_path / "gender.csv"))
    (tmp_path / "empty.csv").write_text("path,subject\n,1\n")
    with pytest.raises(ValueError, match="row 0 has an empty path"):
        records_from_manifest(str(tmp_path / "empty.csv"))
