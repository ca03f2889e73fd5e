"""The coefficients table: one source of truth for its columns, statuses, layouts and labels.

Every stage that reads or writes coefficients (single-process extraction, the Ray Data job, the
trainer, the server) goes through this module, so a column is named in exactly one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa

# 2: face-api's age and male probability are faceapi_age and faceapi_gender_male; `age` is the
# labelled age (tables of version 1 read as version 2: see legacy_renames).
SCHEMA_VERSION = "2"

# Result statuses: every input row gets exactly one.
STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_NO_FACE, STATUS_ERROR)

NUM_LANDMARKS = 68

# Label sets. KDEF and the paper use seven basic expressions; Yale has its own conditions.
EXPRESSIONS_7 = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
YALE_CONDITIONS = (
    "centerlight", "glasses", "happy", "leftlight", "noglasses", "normal",
    "rightlight", "sad", "sleepy", "surprised", "wink",
)
# Yale conditions that are facial expressions (the rest are lighting / accessories).
YALE_EXPRESSIONS = ("happy", "normal", "sad", "sleepy", "surprised", "wink")
GENDERS = ("female", "male")
# face-api's expression classes, in the order of its expression net's outputs (expression_probs).
FACEAPI_EXPRESSIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")


@dataclass(frozen=True)
class CoefficientLayout:
    """How a backend's coefficient vectors are laid out; recorded in every Parquet file."""

    backend: str
    n_id: int
    n_exp: int
    n_tex: int = 0
    n_light: int = 0
    n_feature: int = 0
    model_name: str = ""
    model_version: str = ""
    # How faces were found and landmarked (e.g. "FaceBoxesProd:c0cb2b1e4071", "dlib"): part of
    # the layout so that a resumed extraction refuses to mix rows made with other settings.
    detector: str = ""
    landmark_source: str = ""
    # The texture sampler's vertex set (+ the texture basis tex_coeffs were projected on).
    texture: str = ""
    n_texture_vertices: int = 0
    # The face descriptor that filled face_embedding (facedist.face_descriptor's version: model,
    # weights, chip); "" when the column was not filled.
    face_embedding: str = ""
    # face-api's expression and age/gender nets that filled expression_feature, expression_probs,
    # faceapi_age and faceapi_gender_male (facedist.face_attributes' version: weights, crop); "" when not filled.
    face_attributes: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "CoefficientLayout":
        """Fields a layout was written without take their defaults: tables from before a field
        existed read as made without it."""
        fields = json.loads(text)
        if "landmarks" in fields:  # tables written before the field was named landmark_source
            fields["landmark_source"] = fields.pop("landmarks")
        return cls(**fields)


# Deep3DFaceRecon's 257 outputs, in order.
DEEP3D_SPLITS = (("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27), ("trans", 3))
# 3DDFA_V2's 62 outputs, in order.
TDDFA_SPLITS = (("pose", 12), ("id", 40), ("exp", 10))

_f32_list = pa.list_(pa.float32())

# Columns of the coefficients table. Labels are optional (null when unknown).
COEFFICIENTS_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("content_hash", pa.string()),          # sha1 of the raw bytes; resume key with path
        pa.field("status", pa.string(), nullable=False),  # one of STATUSES
        pa.field("message", pa.string()),               # why a row is not ok ("" when ok)
        pa.field("subject", pa.string()),
        pa.field("expression", pa.string()),            # expression *label*
        pa.field("gender", pa.string()),
        pa.field("view", pa.string()),
        pa.field("age", pa.float32()),                  # age *label*, years (a manifest's age column)
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("num_faces", pa.int32()),
        pa.field("box", _f32_list),                     # x0, y0, x1, y1 of the chosen face
        pa.field("det_score", pa.float32()),
        pa.field("landmarks", _f32_list),               # 68 points the face was located by (a predictor's,
                                                        # or tddfa's previous pass), x0, y0, x1, y1, ...
        pa.field("landmarks_fit", _f32_list),           # 68 points reprojected from the coefficients
        pa.field("landmark_error", pa.float32()),       # mean |fit - detected| / inter-ocular distance
        pa.field("id_coeffs", _f32_list),               # identity coefficients (α in tables)
        pa.field("exp_coeffs", _f32_list),              # expression coefficients (β in tables)
        pa.field("tex_coeffs", _f32_list),
        pa.field("light_coeffs", _f32_list),
        pa.field("yaw", pa.float32()),                  # degrees
        pa.field("pitch", pa.float32()),
        pa.field("roll", pa.float32()),
        pa.field("scale", pa.float32()),
        pa.field("translation", _f32_list),             # 3 values
        pa.field("feature", _f32_list),                 # the regressor's pooled feature (C-Net input)
        pa.field("texture", pa.list_(pa.uint8())),      # RGBA at the layout's n_texture_vertices vertices,
                                                        # A = 255 where visible (facedist.texture)
        pa.field("face_embedding", _f32_list),          # 128 numbers, L2-normalised: dlib's face descriptor
                                                        # (facedist.face_descriptor); null when not computed
        # face-api's nets on the detector's box (facedist.face_attributes); null when not computed:
        pa.field("expression_feature", _f32_list),      # 256 numbers: the expression net's pooled feature
        pa.field("expression_probs", _f32_list),        # 7 probabilities in FACEAPI_EXPRESSIONS order
        pa.field("faceapi_age", pa.float32()),          # years (face-api's estimate; the label is `age`)
        pa.field("faceapi_gender_male", pa.float32()),  # face-api's probability that the face is male
        pa.field("backend", pa.string()),
    ]
)

COLUMNS = tuple(COEFFICIENTS_SCHEMA.names)
# The columns face-api's nets fill, all or none (CoefficientLayout.face_attributes); the keys of
# FaceAttributeNets.predict (which also gives expression_logits).
FACE_ATTRIBUTE_COLUMNS = ("expression_feature", "expression_probs", "faceapi_age", "faceapi_gender_male")

# Descriptor groups: what a task may take as input (`--inputs id,tex`), short name -> the column
# that holds it. A model bundle records its task's groups, and every consumer (training, the
# reports, the Recognizer, /v1/predict, `facedist predict`) builds the input from them.
# fage is one number, face-api's age estimate (the other groups are list columns).
INPUT_GROUPS = {"id": "id_coeffs", "exp": "exp_coeffs", "tex": "tex_coeffs", "feature": "feature",
                "emb": "face_embedding", "expf": "expression_feature", "fage": "faceapi_age"}
# What a task reads when neither its preset nor the user names inputs, and what a model bundle
# written before bundles recorded their inputs was trained on.
DEFAULT_INPUTS = {"identity": ("id",), "gender": ("id",), "expression": ("exp",), "age": ("id",)}
# The rendered names (tables and plots only).
INPUT_GROUP_SYMBOLS = {"id": "α", "exp": "β", "tex": "τ", "feature": "f", "emb": "e", "expf": "x", "fage": "a"}


def parse_inputs(text: str | tuple | list) -> tuple[str, ...]:
    """"id,tex" (or a sequence) -> ("id", "tex"), each a known group, none twice."""
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip())
    unknown = [n for n in names if n not in INPUT_GROUPS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"inputs {text!r}: give distinct groups from {', '.join(INPUT_GROUPS)} (e.g. id,tex)")
    return names


def inputs_label(inputs: tuple[str, ...]) -> str:
    """("id", "tex") -> "α + τ"."""
    return " + ".join(INPUT_GROUP_SYMBOLS.get(n, n) for n in inputs)


LABEL_COLUMNS = ("subject", "expression", "gender", "view", "age")

METADATA_LAYOUT_KEY = b"facedist.layout"
METADATA_SCHEMA_KEY = b"facedist.schema_version"


# Columns renamed since a schema version, {version: {old name: new name}}: version 1 held face-api's
# age estimate in `age` and its male probability in `gender_male`.
RENAMED_COLUMNS = {"1": {"age": "faceapi_age", "gender_male": "faceapi_gender_male"}}


def legacy_renames(schema: pa.Schema) -> dict[str, str]:
    """{old column: current name} for a Parquet file of an older schema version (empty for a current
    one). A file without a recorded version counts as version 1 when it has version 1's
    gender_male column and not its new name."""
    version = (schema.metadata or {}).get(METADATA_SCHEMA_KEY, b"").decode() or None
    if version is None:
        version = "1" if "gender_male" in schema.names and "faceapi_gender_male" not in schema.names else SCHEMA_VERSION
    return {old: new for old, new in RENAMED_COLUMNS.get(version, {}).items() if old in schema.names}


def current_names(schema: pa.Schema) -> list[str]:
    """A file's column names as this version calls them (legacy_renames applied)."""
    renames = legacy_renames(schema)
    return [renames.get(name, name) for name in schema.names]


def schema_with_layout(layout: CoefficientLayout) -> pa.Schema:
    """The table schema with the backend's layout stored in the file metadata."""
    return COEFFICIENTS_SCHEMA.with_metadata(
        {METADATA_LAYOUT_KEY: layout.to_json().encode(), METADATA_SCHEMA_KEY: SCHEMA_VERSION.encode()}
    )


def layout_from_schema(schema: pa.Schema) -> CoefficientLayout | None:
    meta = schema.metadata or {}
    raw = meta.get(METADATA_LAYOUT_KEY)
    return CoefficientLayout.from_json(raw) if raw else None


def rows_to_table(rows: list[dict], layout: CoefficientLayout | None = None) -> pa.Table:
    """Build a table in the canonical schema; missing columns become null."""
    schema = (schema_with_layout(layout) if layout
              else COEFFICIENTS_SCHEMA.with_metadata({METADATA_SCHEMA_KEY: SCHEMA_VERSION.encode()}))
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    return pa.Table.from_pydict(columns, schema=schema)


# ---- the predictions table (`facedist predict`) ------------------------------------------------

# One row per input row. Scores are the models' probabilities; age is the age model's estimate and
# age_mae its expected error; identity_top_k ranks the identity
# labels (identity is its first); group_* are set with --group-by COLUMN: group is the row's
# value of COLUMN, group_identity the identity of the group's rows together (as /v1/predict
# answers for one person's images), the same on every row of the group.
LABEL_SCORE = pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float64())])
PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("content_hash", pa.string()),          # the input row's; resume key with path
        pa.field("status", pa.string(), nullable=False),  # one of STATUSES (image_outcome)
        pa.field("message", pa.string()),
        pa.field("identity", pa.string()),
        pa.field("identity_score", pa.float64()),
        pa.field("identity_top_k", pa.list_(LABEL_SCORE)),
        pa.field("gender", pa.string()),
        pa.field("gender_score", pa.float64()),
        pa.field("age", pa.float64()),                  # years (the age model's estimate)
        pa.field("age_mae", pa.float64()),              # its expected error: its validation MAE, years
        pa.field("expression", pa.string()),
        pa.field("expression_score", pa.float64()),
        pa.field("group", pa.string()),
        pa.field("group_identity", pa.string()),
        pa.field("group_identity_score", pa.float64()),
        # With --gallery (facedist.gallery): the row's photo against the enrolled people, the top-1
        # or "unknown" below the embedding's threshold, and its cosine.
        pa.field("gallery_identity", pa.string()),
        pa.field("gallery_score", pa.float64()),
    ]
)
PREDICTION_COLUMNS = tuple(PREDICTIONS_SCHEMA.names)
# The models and settings a predictions table was made with (JSON in every part's metadata):
# a resumed run must not mix rows of other models.
METADATA_PREDICTIONS_KEY = b"facedist.predictions"


def image_outcome(row: dict, image: dict) -> tuple[str, str]:
    """An image's status and message in a prediction (/v1/predict and `facedist predict`): the
    row's own when extraction did not succeed; "error" with the reason when no model could read
    an ok row (e.g. a descriptor group its models need is missing). ``image``: the entry of
    Recognizer.predict's "images"."""
    status = row.get("status") or STATUS_OK
    if status == STATUS_OK and not image.get("ok"):
        status = STATUS_ERROR
    return status, row.get("message") or image.get("error") or ""


def predictions_to_table(rows: list[dict], settings: dict) -> pa.Table:
    """Prediction rows in PREDICTIONS_SCHEMA, with ``settings`` (models, versions, top-k,
    grouping) as JSON in the metadata."""
    schema = PREDICTIONS_SCHEMA.with_metadata({METADATA_PREDICTIONS_KEY: json.dumps(settings, sort_keys=True).encode(),
                                               METADATA_SCHEMA_KEY: SCHEMA_VERSION.encode()})
    return pa.Table.from_pydict({name: [row.get(name) for row in rows] for name in PREDICTION_COLUMNS}, schema=schema)
