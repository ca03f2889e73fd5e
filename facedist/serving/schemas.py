"""The API's request and response shapes: pydantic models for the OpenAPI documentation, and the
functions that turn extraction rows and recognizer output into those JSON bodies."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

from facedist.schema import FACEAPI_EXPRESSIONS, image_outcome


class ErrorBody(BaseModel):
    code: str = Field(description="not_an_image, invalid_image, too_large, too_many_images, no_face, "
                                  "missing_field, unauthorized, not_multipart, not_configured, "
                                  "replica_unavailable (503: retry), internal")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Pose(BaseModel):
    yaw: float | None = Field(None, description="degrees")
    pitch: float | None = None
    roll: float | None = None
    scale: float | None = None
    translation: list[float] | None = None


class Face(BaseModel):
    box: list[float] | None = Field(None, description="x0, y0, x1, y1 of the chosen face (pixels)")
    det_score: float | None = None
    num_faces: int = 0
    landmarks: list[list[float]] | None = Field(
        None, description="68 (x, y) points the face was located by: a landmark predictor's on the box, "
                          "or for tddfa its previous regression pass")
    landmarks_fit: list[list[float]] | None = Field(None, description="68 points reprojected from the coefficients")
    landmark_error: float | None = Field(None, description="mean |fit - detected| / inter-ocular distance")


class Coefficients(BaseModel):
    id: list[float] | None = Field(None, description="identity coefficients (id_coeffs)")
    exp: list[float] | None = Field(None, description="expression coefficients (exp_coeffs)")
    tex: list[float] | None = None
    light: list[float] | None = None


class Mesh2D(BaseModel):
    vertices: list[list[float]] = Field(description="(x, y) pixels of the decimated fitted mesh's vertices")
    triangles: list[list[int]] = Field(description="vertex index triples (the same topology for every image)")


class Attributes(BaseModel):
    expression: dict | None = Field(None, description="{label, probabilities: {label: p}}: face-api's expression "
                                                      f"net over {', '.join(FACEAPI_EXPRESSIONS)}")
    age: float | None = Field(None, description="years (face-api's age/gender net)")
    gender: dict | None = Field(None, description="{label: male or female, probability: of that label}")


class ExtractResponse(BaseModel):
    status: str
    backend: str | None
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    face: Face
    pose: Pose
    coefficients: Coefficients
    coefficients_sd: Coefficients | None = Field(None, description="id, exp and tex in standard deviations of "
                                                                   "the model's prior (null where it states none)")
    attributes: Attributes | None = Field(None, description="face-api's expression, age and gender of the face; "
                                                            "null when the server does not compute them")
    mesh: Mesh2D | None = Field(None, description="only with ?mesh=true: the fitted face's wireframe projected "
                                                  "into the image; null where the backend has no camera (deep3d)")


class LabelScore(BaseModel):
    label: str
    score: float


class ImagePrediction(BaseModel):
    index: int
    filename: str | None = None
    status: str = Field(description="ok, or no_face/error: such images are left out of the aggregate")
    message: str = ""
    expression: dict | None = Field(None, description="{label, probabilities: {label: p}}")
    confidence: list[float] | None = Field(None, description="C-Net per-dimension confidences c_i")
    confidence_mean: float | None = None
    pose: Pose | None = None


class PredictResponse(BaseModel):
    identity: dict = Field(description="{top_k: [{label, score}], coefficients: the aggregated identity coefficients, "
                                       "aggregation: cnet (confidence-weighted) or mean}")
    gender: dict | None = Field(None, description="{label, probabilities}; null without a gender model")
    age: float | None = Field(None, description="years: the age model's estimate from the person's usable images; "
                                                "null without an age model")
    age_mae: float | None = Field(None, description="the age model's expected error in years (its validation "
                                                    "mean absolute error, on people unseen in training)")
    images: list[ImagePrediction]
    num_images: int
    num_used: int


# ---- row -> JSON helpers --------------------------------------------------------------------

def _points(flat: list[float] | None) -> list[list[float]] | None:
    if flat is None:
        return None
    return [[float(flat[i]), float(flat[i + 1])] for i in range(0, len(flat), 2)]


def pose_of(row: dict) -> dict:
    return {k: row.get(k) for k in ("yaw", "pitch", "roll", "scale", "translation")}


def attributes_of(row: dict) -> dict | None:
    """face-api's outputs of a row as {expression, age, gender}; None when the row has none."""
    probs, age, male = row.get("expression_probs"), row.get("faceapi_age"), row.get("faceapi_gender_male")
    if probs is None and age is None and male is None:
        return None
    expression = None
    if probs is not None:
        expression = {"label": FACEAPI_EXPRESSIONS[max(range(len(probs)), key=probs.__getitem__)],
                      "probabilities": {label: float(p) for label, p in zip(FACEAPI_EXPRESSIONS, probs)}}
    gender = None
    if male is not None:
        gender = {"label": "male", "probability": float(male)} if male >= 0.5 else \
            {"label": "female", "probability": 1.0 - float(male)}
    return {"expression": expression, "age": None if age is None else float(age), "gender": gender}


def extraction_response(row: dict, filename: str | None = None) -> dict:
    return {
        "status": row.get("status"),
        "backend": row.get("backend"),
        "filename": filename,
        "width": row.get("width"),
        "height": row.get("height"),
        "face": {
            "box": row.get("box"),
            "det_score": row.get("det_score"),
            "num_faces": row.get("num_faces") or 0,
            "landmarks": _points(row.get("landmarks")),
            "landmarks_fit": _points(row.get("landmarks_fit")),
            "landmark_error": row.get("landmark_error"),
        },
        "pose": pose_of(row),
        # The same in standard deviations of the model's prior: comparable across dimensions.
        "coefficients_sd": row.get("coefficients_sd"),
        "coefficients": {
            "id": row.get("id_coeffs"),
            "exp": row.get("exp_coeffs"),
            "tex": row.get("tex_coeffs"),
            "light": row.get("light_coeffs"),
        },
        "attributes": attributes_of(row),
    }


# ---- OpenAPI documentation of the errors and of the multipart bodies ------------------------

ERROR_RESPONSES = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    413: {"model": ErrorResponse, "description": "too large / too many images"},
    415: {"model": ErrorResponse, "description": "not an image, or not a multipart upload"},
    422: {"model": ErrorResponse, "description": "no face, corrupt image, missing field"},
}


def multipart_doc(field_name: str, many: bool) -> dict:
    item = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": item} if many else item
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [field_name], "properties": {field_name: prop}}}}}}


# ---- uploads and predictions ----------------------------------------------------------------

@dataclass
class Upload:
    """One file of a multipart field, read within the size limit."""

    index: int
    filename: str | None
    data: bytes


def prediction_response(prediction: dict, rows: list[dict], uploads: list[Upload]) -> dict:
    """Recognizer.predict output + the extraction rows -> the /v1/predict JSON."""
    images = []
    for upload, row, entry in zip(uploads, rows, prediction["images"]):
        probabilities = entry.get("expression")
        status, message = image_outcome(row, entry)
        images.append({
            "index": upload.index, "filename": upload.filename, "status": status, "message": message,
            "expression": {"label": entry.get("expression_label"), "probabilities": probabilities}
            if probabilities else None,
            "confidence": entry.get("confidence"), "confidence_mean": entry.get("confidence_mean"),
            "pose": pose_of(row) if row["status"] == "ok" else None,
        })
    gender = prediction.get("gender")
    return {
        "identity": {**(prediction.get("identity") or {"top_k": []}),
                     "coefficients": prediction.get("identity_coeffs"),
                     "aggregation": prediction.get("aggregation")},
        "gender": {"label": gender["label"], "probabilities": gender["scores"]} if gender else None,
        "age": prediction.get("age"), "age_mae": prediction.get("age_mae"),
        "images": images, "num_images": len(rows), "num_used": prediction.get("n_used", 0),
    }

