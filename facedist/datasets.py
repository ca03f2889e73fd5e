"""Image records with labels, from the datasets' own file naming, a folder tree, or a manifest.

Labels use the vocabularies in facedist.schema (EXPRESSIONS_7, YALE_CONDITIONS, GENDERS).
Listing files is facedist.storage's job; everything here takes path strings (local or s3://).
A file whose name no parser knows still gets a record, just without labels: nothing is dropped.

Naming conventions handled:
  KDEF  "AF01ANS.JPG": session A/B, sex F/M, id 01-70, expression (AF AN DI HA NE SA SU),
        view (FL HL S HR FR). Identity = sex + id ("F01"): the two sessions are the same person.
  Yale  "subject07.happy": subject + condition; expressions go to `expression`, lighting and
        glasses conditions to `view`.
  FEI   "12-11.jpg": subject 1-200, pose 01-14 (11 frontal neutral, 12 frontal smiling); gender
        from separate lists of subjects. The frontal-only release's "12a.jpg"/"12b.jpg"
        (neutral/smiling) is understood when the dataset is named explicitly.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import pyarrow as pa

from facedist.schema import EXPRESSIONS_7, GENDERS, LABEL_COLUMNS, YALE_CONDITIONS, YALE_EXPRESSIONS

DATASETS = ("auto", "kdef", "yale", "fei", "folder", "none")


@dataclass(frozen=True)
class ImageRecord:
    """One input image: where it is, and what is known about it (None = unknown)."""

    path: str
    subject: str | None = None
    expression: str | None = None
    gender: str | None = None
    view: str | None = None
    age: float | None = None       # years


def _basename(path: str) -> str:
    return posixpath.basename(str(path).replace("\\", "/").rstrip("/"))


# ------------------------------------------------------------------------------------------ KDEF

KDEF_EXPRESSIONS = {"AF": "fear", "AN": "angry", "DI": "disgust", "HA": "happy", "NE": "neutral",
                    "SA": "sad", "SU": "surprise"}
KDEF_VIEWS = {"FL": "full_left", "HL": "half_left", "S": "straight", "HR": "half_right",
              "FR": "full_right"}
_IMAGE_EXT = r"(?:\.(?:jpe?g|png|bmp|gif|tiff?|webp))?"
_KDEF_RE = re.compile(
    r"^(?P<session>[AB])(?P<sex>[FM])(?P<id>\d{2})(?P<expr>AF|AN|DI|HA|NE|SA|SU)(?P<view>FL|HL|HR|FR|S)"
    + _IMAGE_EXT + r"$",
    re.IGNORECASE,
)
assert set(KDEF_EXPRESSIONS.values()) == set(EXPRESSIONS_7)


def parse_kdef_name(name: str) -> dict | None:
    """KDEF file name -> {subject, expression, gender, view, session}, or None."""
    match = _KDEF_RE.match(_basename(name))
    if match is None:
        return None
    sex = match["sex"].upper()
    return {
        "dataset": "kdef",
        "subject": sex + match["id"],
        "expression": KDEF_EXPRESSIONS[match["expr"].upper()],
        "gender": "female" if sex == "F" else "male",
        "view": KDEF_VIEWS[match["view"].upper()],
        "session": match["session"].upper(),
    }


# ------------------------------------------------------------------------------------------ Yale

_YALE_RE = re.compile(r"^(?P<subject>subject\d{2})(?:\.(?P<condition>[a-z]+))?" + _IMAGE_EXT + r"$",
                      re.IGNORECASE)


def parse_yale_name(name: str) -> dict | None:
    """Yale file name -> {subject, expression, view, condition}, or None.

    An unknown condition (e.g. the stray "subject01.gif" of some copies) keeps the subject and
    leaves the other labels empty."""
    match = _YALE_RE.match(_basename(name))
    if match is None:
        return None
    condition = (match["condition"] or "").lower()
    if condition not in YALE_CONDITIONS:
        condition = None
    return {
        "dataset": "yale",
        "subject": match["subject"].lower(),
        "expression": condition if condition in YALE_EXPRESSIONS else None,
        "gender": None,
        "view": condition if condition is not None and condition not in YALE_EXPRESSIONS else None,
        "condition": condition,
    }


# ------------------------------------------------------------------------------------------- FEI

FEI_NUM_SUBJECTS = 200
FEI_NUM_POSES = 14
FEI_POSE_EXPRESSIONS = {11: "neutral", 12: "happy"}
_FEI_RE = re.compile(r"^(?P<subject>\d{1,3})-(?P<pose>\d{2})" + _IMAGE_EXT + r"$", re.IGNORECASE)
# The frontal, manually aligned release: "12a.jpg" neutral, "12b.jpg" smiling.
_FEI_FRONTAL_RE = re.compile(r"^(?P<subject>\d{1,3})(?P<which>[ab])" + _IMAGE_EXT + r"$", re.IGNORECASE)


def parse_fei_name(name: str, *, frontal_release: bool = True) -> dict | None:
    """FEI file name -> {subject, pose, expression, view}, or None. Gender is not in the name
    (see records_from_fei)."""
    base = _basename(name)
    match = _FEI_RE.match(base)
    if match is not None:
        subject, pose = int(match["subject"]), int(match["pose"])
    else:
        match = _FEI_FRONTAL_RE.match(base) if frontal_release else None
        if match is None:
            return None
        subject, pose = int(match["subject"]), 11 if match["which"].lower() == "a" else 12
    if not (1 <= subject <= FEI_NUM_SUBJECTS and 1 <= pose <= FEI_NUM_POSES):
        return None
    return {
        "dataset": "fei",
        "subject": str(subject),
        "expression": FEI_POSE_EXPRESSIONS.get(pose),
        "gender": None,
        "view": f"{pose:02d}",
        "pose": pose,
    }


def _fei_subject_of(entry: str) -> str | None:
    """A line of a gender list: a subject number ("12", "012") or a file name ("12-01.jpg")."""
    entry = entry.strip()
    if not entry or entry.startswith("#"):
        return None
    if entry.isdigit():
        return str(int(entry))
    parsed = parse_fei_name(entry)
    if parsed is None:
        raise ValueError(f"not an FEI subject number or file name: {entry!r}")
    return parsed["subject"]


def parse_fei_id_list(text: str) -> set[str]:
    """Subject ids from a list: one number or file name per line (blank lines, # comments skipped)."""
    return {s for s in (_fei_subject_of(line) for line in text.splitlines()) if s is not None}


def load_fei_gender_lists(females: str, males: str) -> tuple[set[str], set[str]]:
    """(female_ids, male_ids) from two list files (local paths or s3:// URIs)."""
    female_ids = parse_fei_id_list(_read_text(females))
    male_ids = parse_fei_id_list(_read_text(males))
    both = female_ids & male_ids
    if both:
        raise ValueError(f"FEI subjects listed as both female and male: {sorted(both, key=int)}")
    return female_ids, male_ids


def records_from_fei(paths: Iterable[str], female_ids: set[str], male_ids: set[str]) -> list[ImageRecord]:
    """FEI records with gender from the lists; names that are not FEI get no labels."""
    female_ids = {str(int(s)) for s in female_ids}
    male_ids = {str(int(s)) for s in male_ids}
    records = []
    for path in paths:
        labels = parse_fei_name(path)
        if labels is not None:
            subject = labels["subject"]
            labels["gender"] = "female" if subject in female_ids else "male" if subject in male_ids else None
        records.append(_record(path, labels))
    return records


# ----------------------------------------------------------------------------------------- paths

def _record(path: str, labels: dict | None) -> ImageRecord:
    if not labels:
        return ImageRecord(path=str(path))
    return ImageRecord(path=str(path), **{k: labels.get(k) for k in LABEL_COLUMNS})


def parse_name(name: str) -> dict | None:
    """Labels from a file name of any known dataset (KDEF, Yale, FEI "<n>-<pose>"), or None."""
    return (parse_kdef_name(name) or parse_yale_name(name)
            or parse_fei_name(name, frontal_release=False))


def _normalise_root(root: str) -> str:
    root = str(root)
    if root.startswith("s3://"):
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def _folder_label(path: str, root: str | None) -> str | None:
    """First folder below root (root/<label>/.../file), or the file's parent folder without root."""
    path = str(path)
    if root is None:
        parent = PurePosixPath(path.replace("\\", "/")).parent.name
        return parent or None
    root_norm = _normalise_root(root)
    path_norm = path.rstrip("/") if path.startswith("s3://") else str(Path(path).expanduser().resolve())
    prefix = root_norm.rstrip("/") + "/"
    if not path_norm.startswith(prefix):
        return None
    parts = path_norm[len(prefix):].split("/")
    return parts[0] if len(parts) > 1 else None


def records_from_paths(paths: Iterable[str], dataset: str = "auto", root: str | None = None) -> list[ImageRecord]:
    """One record per path, in order, labelled by the dataset's naming convention.

    dataset: "auto" (per file: KDEF, Yale or FEI names), "kdef", "yale", "fei", "folder"
    (root/<label>/<file> -> subject=label) or "none" (no labels)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    paths = [str(p) for p in paths]
    if dataset == "none":
        return [ImageRecord(path=p) for p in paths]
    if dataset == "folder":
        return [ImageRecord(path=p, subject=_folder_label(p, root)) for p in paths]
    if dataset == "fei":
        gender_lists = _find_fei_gender_lists(root) if root is not None else None
        if gender_lists is not None:
            return records_from_fei(paths, *gender_lists)
        return [_record(p, parse_fei_name(p)) for p in paths]
    parse = {"auto": parse_name, "kdef": parse_kdef_name, "yale": parse_yale_name}[dataset]
    return [_record(p, parse(p)) for p in paths]


FEI_GENDER_LIST_NAMES = (("females.txt", "males.txt"), ("female.txt", "male.txt"))


def _find_fei_gender_lists(root: str) -> tuple[set[str], set[str]] | None:
    """FEI gender lists saved beside the images (root/females.txt + root/males.txt), if any."""
    from facedist import storage

    for female_name, male_name in FEI_GENDER_LIST_NAMES:
        females, males = storage.join(root, female_name), storage.join(root, male_name)
        if storage.exists(females) and storage.exists(males):
            return load_fei_gender_lists(females, males)
    return None


# -------------------------------------------------------------------------------------- manifest

_GENDER_ALIASES = {"f": "female", "female": "female", "woman": "female",
                   "m": "male", "male": "male", "man": "male"}


def _read_bytes(uri: str) -> bytes:
    if str(uri).startswith("s3://"):
        from facedist import storage

        return storage.read_bytes(uri)
    return Path(uri).expanduser().read_bytes()


def _read_text(uri: str) -> str:
    return _read_bytes(uri).decode("utf-8-sig")


def _read_manifest(uri: str) -> pa.Table:
    data = _read_bytes(uri)
    if str(uri).lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data))
    import pyarrow.csv as pacsv

    # Every column as text: subject "007" must not become the integer 7.
    first_line = data.decode("utf-8-sig", errors="replace").splitlines()[:1]
    names = next(csv.reader(first_line), [])
    types = {name: pa.string() for name in names}
    return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
        column_types=types, strings_can_be_null=True))


def _resolve(path: str, base: str | None) -> str:
    if path.startswith("s3://") or base is None:
        return path
    if base.startswith("s3://"):
        key = posixpath.normpath(posixpath.join(base[len("s3://"):], path.lstrip("/")))
        return "s3://" + key
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else Path(base) / candidate)


def _clean_label(column: str, value) -> str | float | None:
    if value is None:
        return None
    value = str(value).strip()
    if not value or value.lower() in ("nan", "none", "null", "na", "n/a"):
        return None
    if column == "age":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"age {value!r} is not a number of years (leave it empty or NA when unknown)") from None
    if column == "gender":
        gender = _GENDER_ALIASES.get(value.lower())
        if gender is None:
            raise ValueError(f"unknown gender {value!r}; use one of {GENDERS}")
        return gender
    if column == "expression":
        return value.lower()
    return value


def records_from_manifest(table: pa.Table | str, base: str | None = None) -> list[ImageRecord]:
    """Records from a CSV/Parquet manifest (path or table) with a `path` column and optional
    label columns (subject, expression, gender, view, age in years). Relative paths resolve against the
    manifest's folder (or `base` for a table)."""
    if not isinstance(table, pa.Table):
        uri = str(table)
        if base is None:
            base = uri.rsplit("/", 1)[0] if uri.startswith("s3://") else str(Path(uri).expanduser().resolve().parent)
        table = _read_manifest(uri)
    if "path" not in table.column_names:
        raise ValueError(f"manifest has no 'path' column (columns: {table.column_names})")
    columns = {name: table.column(name).to_pylist() for name in ("path", *LABEL_COLUMNS)
               if name in table.column_names}
    records = []
    for i, path in enumerate(columns["path"]):
        if path is None or not str(path).strip():
            raise ValueError(f"manifest row {i} has an empty path")
        labels = {name: _clean_label(name, columns[name][i]) for name in LABEL_COLUMNS if name in columns}
        records.append(ImageRecord(path=_resolve(str(path).strip(), base), **labels))
    return records
