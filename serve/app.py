"""The online inference endpoint: FastAPI ingress -> batched extraction -> batched recognition.

Three Ray Serve deployments:
  * FaceExtractor: one coefficient extractor per replica (models load once, in __init__), fed
    through @serve.batch so concurrent requests share one detector and one regressor forward;
    it decodes the uploads (an undecodable one never reaches a model); GPU when present.
  * FaceRecognizer: C-Net aggregation + the identity/gender/expression classifiers written by the
    training job (local directory or s3://), batched over concurrent /v1/predict requests.
  * FacedistAPI: the FastAPI ingress. It checks auth and limits, parses the multipart upload,
    fans single encoded images out to the extractor (images of concurrent requests land in one
    batch) and answers a bad upload with its own 4xx.

Run:
    serve run serve.app:build_app models_uri=s3://bucket/models       # or: facedist serve
    serve deploy serve/config.yaml
API (also on /docs):
    GET  /             the web page: drop photos, see the fitted face and the predictions
    POST /v1/extract   multipart field "image"           -> coefficients, landmarks, pose
                       (?mesh=true: also the decimated fitted mesh in image pixels)
    POST /v1/predict   multipart field "images" (1..K)   -> identity top-k, gender, expressions
    GET  /v1/health, GET /v1/models
With FACEDIST_API_TOKEN set (read when a replica starts), every endpoint but the page,
/v1/health and the docs needs "Authorization: Bearer <token>".
"""

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import html
import json
import logging
import os
import time
import typing
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

logger = logging.getLogger("ray.serve")

API_TOKEN_ENV = "FACEDIST_API_TOKEN"
MODELS_URI_ENV = "FACEDIST_MODELS_URI"
API_VERSION = "1"


# ---- configuration --------------------------------------------------------------------------

@dataclass
class ServeSettings:
    """Everything the app builder takes (serve/config.yaml `args`, `serve run ... key=value`)."""

    models_uri: str | None = None     # training output with the recognizer bundles; None: /v1/predict is 503
    backend: str = "tddfa"            # facedist.extractors.make_extractor backend
    detector: str = "faceboxes"       # face detector: faceboxes (one batched forward per batch) or dlib
    landmarks: str | None = None      # 68-point source for fit/deep3d; None: the backend's own
    device: str = "auto"              # auto: cuda when the replica got a GPU, else cpu
    max_image_bytes: int = 10 * 1024 * 1024
    max_images: int = 16              # per /v1/predict request
    max_side: int = 1024              # uploads are downscaled on decode to at most this side
    top_k: int = 5
    # Batching: max_batch_size=1 turns batching off (the benchmark's baseline).
    max_batch_size: int = 16
    # How long a batch waits to fill after its first image: longer batches cost the detector and
    # the regressor less per image (benchmarks/serve_load.py), for that much latency at low load.
    batch_wait_timeout_s: float = 0.05
    predict_max_batch_size: int = 8
    predict_batch_wait_timeout_s: float = 0.005
    # Resources and autoscaling of the extractor (the expensive part).
    extractor_num_cpus: float = 0.5
    # dlib HOG detection threads per extractor replica, shared by a batch's images (dlib
    # releases the GIL); 0: one per whole CPU of extractor_num_cpus, at least 1.
    detect_threads: int = 0
    num_gpus: float | None = None     # None: 0.5 per extractor replica when the cluster has GPUs
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 30.0  # window the ongoing-request average is taken over
    num_replicas: int | None = None   # fixed replica count instead of autoscaling (benchmarks)
    # At most this many extractor replicas per node (None: no limit); 1 spreads them, so losing a
    # node loses one replica, not all of them.
    max_replicas_per_node: int | None = None
    ingress_num_cpus: float = 0.25
    recognizer_num_cpus: float = 0.25

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeSettings":
        """Build from builder args, coercing the strings `serve run key=value` passes."""
        args = dict(args or {})
        unknown = set(args) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown serve settings: {', '.join(sorted(unknown))}")
        if "models_uri" not in args and os.environ.get(MODELS_URI_ENV):
            args["models_uri"] = os.environ[MODELS_URI_ENV]
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in args:
                continue
            values[f.name] = _coerce(args[f.name], f.type, f.name)
        return cls(**values)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    if not isinstance(value, str):
        return value
    options = typing.get_args(annotation) or (annotation,)
    if type(None) in options and value.strip().lower() in ("", "none", "null"):
        return None
    for kind in (int, float):
        if kind in options:
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"serve setting {name}={value!r} is not a {kind.__name__}") from None
    return value


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- errors ---------------------------------------------------------------------------------

class ApiError(Exception):
    """A request problem answered as {"error": {"code", "message", ...}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, **details: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"code": self.code, "message": self.message, **self.details}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def decode_error_to_api(message: str, **details: Any) -> ApiError:
    """facedist.images.ImageDecodeError messages -> status + code."""
    if message.startswith("image too large"):
        return ApiError(413, "too_large", message, **details)
    if message.startswith(("not an image", "empty file")):
        return ApiError(415, "not_an_image", message, **details)
    return ApiError(422, "invalid_image", message, **details)


# ---- response models (OpenAPI documentation) -------------------------------------------------

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
    id: list[float] | None = Field(None, description="identity alpha")
    exp: list[float] | None = Field(None, description="expression beta")
    tex: list[float] | None = None
    light: list[float] | None = None


class Mesh2D(BaseModel):
    vertices: list[list[float]] = Field(description="(x, y) pixels of the decimated fitted mesh's vertices")
    triangles: list[list[int]] = Field(description="vertex index triples (the same topology for every image)")


class ExtractResponse(BaseModel):
    status: str
    backend: str | None
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    face: Face
    pose: Pose
    coefficients: Coefficients
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
    identity: dict = Field(description="{top_k: [{label, score}], coefficients: the aggregated alpha, "
                                       "aggregation: cnet (confidence-weighted) or mean}")
    gender: dict | None = Field(None, description="{label, probabilities}; null without a gender model")
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
        "coefficients": {
            "id": row.get("id_coeffs"),
            "exp": row.get("exp_coeffs"),
            "tex": row.get("tex_coeffs"),
            "light": row.get("light_coeffs"),
        },
    }


# ---- model deployments ----------------------------------------------------------------------

@serve.deployment(name="FaceExtractor", max_ongoing_requests=64,
                  ray_actor_options={"num_cpus": 0.5})
class FaceExtractor:
    """One extractor per replica; concurrent single-image calls are grouped into batches, and a
    batch's faces are detected together (FaceBoxes: one batched forward)."""

    def __init__(self, backend: str, detector: str, landmarks: str | None, device: str,
                 max_batch_size: int, batch_wait_timeout_s: float, detect_threads: int = 1,
                 torch_threads: int = 1, max_side: int = 1024):
        import torch

        from facedist.extractors import make_extractor

        # The replica's CPU share, whole CPUs, at least 1: FaceBoxes and the regressor use them.
        torch.set_num_threads(max(1, torch_threads))
        self.torch_threads = torch.get_num_threads()
        self.max_side = max_side  # uploads are downscaled on decode to at most this side
        self.device = _resolve_device(device)
        self.extractor = make_extractor(backend, detector=detector, landmarks=landmarks, device=self.device,
                                        detect_threads=max(1, detect_threads))
        self.extract.set_max_batch_size(max_batch_size)
        self.extract.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.started = time.time()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def extract(self, items: list[tuple[bytes, bool]]) -> list[dict]:
        """Per image (encoded upload, with_mesh); a coefficients row per image out. An upload that
        does not decode comes back as an error row marked decode_error. with_mesh adds the
        decimated fitted mesh in pixels (mesh2d)."""
        self.batch_sizes[len(items)] += 1
        # Decoding and the models run in a worker thread so the replica keeps accepting (and
        # batching) requests.
        return await asyncio.to_thread(self._extract_rows, items)

    def _extract_rows(self, items: list[tuple[bytes, bool]]) -> list[dict]:
        from facedist.mesh import result_mesh2d
        from facedist.pipeline import decode_row, extract_rows

        # The pipeline's own row functions: a bad upload is its row's error, rows in = rows out.
        decoded = [decode_row({"path": f"upload-{i}", "bytes": upload}, self.max_side)
                   for i, (upload, _) in enumerate(items)]
        finished, results = extract_rows(decoded, self.extractor)
        # The mesh is computed here, where the camera is known (tddfa/fit; deep3d has none), and
        # only when asked for: a few thousand numbers per row most requests do not want.
        model = getattr(self.extractor, "model", None)
        for row, source, result, (_, with_mesh) in zip(finished, decoded, results, items):
            if source["image"] is None:
                row["decode_error"] = True
            elif with_mesh and row.get("status") == "ok":
                points = result_mesh2d(result, model)
                if points is not None:
                    row["mesh2d"] = np.round(points, 1).tolist()
        return finished

    def mesh_triangles(self) -> list[list[int]] | None:
        """The decimated mesh's triangles (one topology for every image), or None without one."""
        from facedist.mesh import decimated_mesh

        model = getattr(self.extractor, "model", None)
        return decimated_mesh(model)[1].tolist() if model is not None else None

    def info(self) -> dict:
        layout = getattr(self.extractor, "layout", None)
        return {
            "name": getattr(self.extractor, "name", None),
            "device": self.device,
            "layout": dataclasses.asdict(layout) if layout is not None else None,
            "max_batch_size": self.extract._get_max_batch_size(),
            "detector": getattr(getattr(self.extractor, "detector", None), "name", None),
            "detect_threads": getattr(getattr(self.extractor, "detector", None), "threads", 1),
            "torch_threads": self.torch_threads,
        }

    def stats(self) -> dict:
        """Batch sizes seen and, when the extractor keeps them, CPU/wall seconds per stage."""
        timings = getattr(self.extractor, "timings", None)
        stages = {kind: dict(getattr(timings, kind)) for kind in ("cpu", "wall") if hasattr(timings, kind)}
        return {"batch_sizes": dict(self.batch_sizes), "stage_seconds": stages,
                "images": sum(size * count for size, count in self.batch_sizes.items()),
                "uptime_s": time.time() - self.started}

    def reset_stats(self) -> None:
        self.batch_sizes.clear()
        timings = getattr(self.extractor, "timings", None)
        if hasattr(timings, "clear"):
            timings.clear()


@serve.deployment(name="FaceRecognizer", max_ongoing_requests=64,
                  ray_actor_options={"num_cpus": 0.25})
class FaceRecognizer:
    """C-Net aggregation + classifiers from the training job's bundles, loaded once per replica."""

    def __init__(self, models_uri: str | None, backend: str, top_k: int,
                 max_batch_size: int, batch_wait_timeout_s: float):
        self.models_uri = models_uri or None
        self.top_k = top_k
        self.recognizer = None
        self.versions: dict[str, str] = {}
        if self.models_uri:
            from facedist.training.inference import Recognizer

            self.recognizer = Recognizer.from_directory(self.models_uri)
            check_layouts(self.recognizer.bundles, backend)
            self.versions = {task: bundle_version(b) for task, b in self.recognizer.bundles.items()}
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def predict(self, people: list[list[dict]]) -> list[dict]:
        """people: for each request, the extraction rows of one person's images."""
        return await asyncio.to_thread(self._predict_people, people)

    def _predict_people(self, people: list[list[dict]]) -> list[dict]:
        # The bundles' models are tiny; a batch saves the per-request thread and RPC hops.
        return [self.recognizer.predict(rows, top_k=self.top_k) for rows in people]

    def info(self) -> dict | None:
        if self.recognizer is None:
            return None
        models = {}
        for task, bundle in self.recognizer.bundles.items():
            layout = json.loads(bundle["layout"]) if bundle.get("layout") else {}
            models[task] = {"version": self.versions[task], "labels": bundle.get("labels") or [],
                            "metrics": bundle.get("metrics") or {}, "trained_on": layout,
                            "format_version": bundle.get("format_version")}
        return {"models_uri": self.models_uri, "models": models}


def bundle_version(bundle: dict) -> str:
    """12 hex digits of sha256 over the weights: changes exactly when the model does."""
    digest = hashlib.sha256()
    for name, tensor in sorted(bundle["state_dict"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def check_layouts(bundles: dict[str, dict], backend: str) -> None:
    """Classifiers trained on another regressor's coefficients would answer nonsense: refuse."""
    for task, bundle in bundles.items():
        layout = json.loads(bundle["layout"]) if bundle.get("layout") else None
        if layout and layout.get("backend") and layout["backend"] != backend:
            raise ValueError(f"the {task} model was trained on {layout['backend']} coefficients but the "
                             f"server extracts with {backend}; start it with backend={layout['backend']}")


# ---- HTTP ingress ---------------------------------------------------------------------------

api = FastAPI(
    title="facedist",
    version=API_VERSION,
    description="3DMM face analysis: coefficients from one photo, identity/gender/expressions "
                "from one or several photos of a person. Images are multipart uploads. Errors are "
                '{"error": {"code", "message"}} with a 4xx status.',
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    where = ".".join(str(p) for p in problems[0].get("loc", ())) if problems else "request"
    return ApiError(422, "invalid_request", f"{where}: {problems[0].get('msg') if problems else exc}").response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return ApiError(exc.status_code, code, str(exc.detail)).response()


@api.exception_handler(RayActorError)
async def _replica_lost(_: Request, exc: RayActorError) -> JSONResponse:
    # A replica died (its node was lost) with this request in it: the next request goes to a live
    # one, so the client is told to retry rather than given a bare 500.
    logger.warning("a replica was lost during a request: %s", exc)
    body = ApiError(503, "replica_unavailable", "the model replica handling this request was lost "
                    "(node failure); retry the request").response()
    body.headers["Retry-After"] = "1"
    return body


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return ApiError(500, "internal", f"{type(exc).__name__}: {exc}").response()


_ERRORS = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    413: {"model": ErrorResponse, "description": "too large / too many images"},
    415: {"model": ErrorResponse, "description": "not an image, or not a multipart upload"},
    422: {"model": ErrorResponse, "description": "no face, corrupt image, missing field"},
}


def _multipart_doc(field_name: str, many: bool) -> dict:
    item = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": item} if many else item
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [field_name], "properties": {field_name: prop}}}}}}


@dataclass
class Upload:
    index: int
    filename: str | None
    data: bytes


def prediction_response(prediction: dict, rows: list[dict], uploads: list[Upload]) -> dict:
    """Recognizer.predict output + the extraction rows -> the /v1/predict JSON."""
    images = []
    for upload, row, entry in zip(uploads, rows, prediction["images"]):
        probabilities = entry.get("expression")
        images.append({
            "index": upload.index, "filename": upload.filename,
            "status": row["status"] if row["status"] != "ok" or entry.get("ok") else "error",
            "message": row.get("message") or entry.get("error") or "",
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
        "images": images, "num_images": len(rows), "num_used": prediction.get("n_used", 0),
    }


@functools.lru_cache(maxsize=1)
def _page_template() -> str:
    from importlib.resources import files

    return (files("facedist") / "web" / "index.html").read_text(encoding="utf-8")


def index_page(root_path: str) -> str:
    """The web page with <base href> set to where the app is mounted, so its relative fetch URLs
    (v1/extract, ...) work under any route prefix."""
    base = html.escape(root_path.rstrip("/") + "/", quote=True)
    return _page_template().replace('<base href="./">', f'<base href="{base}">', 1)


# Note: everything the ingress methods use must be defined above the class: @serve.ingress
# pickles the FastAPI app (with these methods and the globals they see) when the class is made.
@serve.deployment(name="FacedistAPI", max_ongoing_requests=256,
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class FacedistAPI:
    def __init__(self, extractor, recognizer, settings: dict):
        self.settings = ServeSettings(**settings)
        self.extractor = extractor
        self.recognizer = recognizer if self.settings.models_uri else None
        # Read once, at replica start: rotating the token means restarting the replicas.
        self.token = os.environ.get(API_TOKEN_ENV) or None

    # -- checks shared by the endpoints --

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "wrong bearer token")

    async def _read_uploads(self, request: Request, field_name: str, max_count: int) -> list[Upload]:
        """The files under one multipart field, with every limit checked before any decoding."""
        s = self.settings
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(415, "not_multipart",
                           f"expected a multipart/form-data upload with field '{field_name}', "
                           f"got content-type {content_type or 'none'!r}")
        # Reject an oversized body from its declared length before reading it.
        max_body = s.max_image_bytes * max_count + 64 * 1024
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            raise ApiError(413, "too_large",
                           f"request body is {int(length)} bytes; the limit is {max_body} "
                           f"({max_count} image(s) of at most {s.max_image_bytes} bytes)")
        try:
            form = await request.form(max_files=max_count + 8, max_fields=32)
        except (StarletteHTTPException, MultiPartException) as exc:
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
            if "Too many files" in str(detail):
                raise ApiError(413, "too_many_images",
                               f"too many files; at most {max_count} image(s) per request") from None
            raise ApiError(400, "bad_multipart", f"could not parse the upload: {detail}") from None
        try:
            return await self._collect(form, field_name, max_count)
        finally:
            await form.close()  # spooled temporary files go now, also after a rejection

    async def _collect(self, form, field_name: str, max_count: int) -> list[Upload]:
        s = self.settings
        items = form.getlist(field_name)
        if not items:
            present = sorted(set(form.keys()))
            raise ApiError(422, "missing_field",
                           f"missing field '{field_name}' (multipart file upload)"
                           + (f"; got fields {present}" if present else ""), field=field_name)
        if len(items) > max_count:
            raise ApiError(413, "too_many_images",
                           f"{len(items)} images; at most {max_count} per request", field=field_name)
        uploads = []
        for index, item in enumerate(items):
            if not isinstance(item, UploadFile):
                raise ApiError(422, "not_a_file",
                               f"field '{field_name}' #{index} is a text value, not a file upload",
                               field=field_name, index=index)
            data = await item.read(s.max_image_bytes + 1)
            if len(data) > s.max_image_bytes:
                raise ApiError(413, "too_large",
                               f"image #{index} ({item.filename}) is larger than {s.max_image_bytes} bytes",
                               field=field_name, index=index)
            uploads.append(Upload(index, item.filename, data))
        return uploads

    @staticmethod
    def _check_not_image(upload: Upload) -> None:
        """For an upload whose first bytes are no known image format: the decoder's own 4xx
        (empty, text, HTML, unrecognised), raised here before any model work for the request."""
        from facedist.images import ImageDecodeError, decode_image

        try:
            decode_image(upload.data, max_side=64)  # fails fast on what is not an image
        except ImageDecodeError as exc:
            raise decode_error_to_api(f"{exc}", index=upload.index, filename=upload.filename) from None

    async def _extract(self, uploads: list[Upload], mesh: bool = False) -> list[dict]:
        from facedist.images import sniff_format

        # What is plainly no image is turned away first, so a request with one such file costs
        # no model work; a truncated or corrupt image is found by the extractor's decoder.
        for upload in uploads:
            if sniff_format(upload.data) is None:
                await asyncio.to_thread(self._check_not_image, upload)
        # One call per image, all in flight at once: the extractor batches them with other
        # requests. The encoded bytes travel (several times smaller than the decoded pixels) and
        # the extractor decodes; an upload that does not decode comes back marked and is answered
        # here with its 4xx before the request goes on.
        rows = list(await asyncio.gather(*(self.extractor.extract.remote((u.data, mesh)) for u in uploads)))
        for upload, row in zip(uploads, rows):
            if row.get("decode_error"):
                raise decode_error_to_api(row["message"], index=upload.index, filename=upload.filename)
        return rows

    async def _mesh_triangles(self) -> list[list[int]] | None:
        if not hasattr(self, "_triangles"):  # one topology per extractor model: asked for once
            self._triangles = await self.extractor.mesh_triangles.remote()
        return self._triangles

    # -- endpoints --

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        # No token: the page asks for one when the API answers 401.
        return HTMLResponse(index_page(request.scope.get("root_path") or ""))

    @api.get("/v1/health", summary="Liveness and readiness (no token needed)")
    async def health(self) -> dict:
        extractor = await self.extractor.info.remote()
        return {"status": "ok", "extractor": extractor["name"],
                "recognizer": "ready" if self.recognizer is not None else "not_configured"}

    @api.get("/v1/models", summary="Loaded models: names, versions, labels")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        extractor = await self.extractor.info.remote()
        recognizer = await self.recognizer.info.remote() if self.recognizer is not None else None
        return {"api_version": API_VERSION, "extractor": extractor, "recognizer": recognizer,
                "limits": {"max_image_bytes": self.settings.max_image_bytes,
                           "max_images": self.settings.max_images, "max_side": self.settings.max_side}}

    # exclude_unset: "mesh" is left out entirely unless asked for (every other key is always set).
    @api.post("/v1/extract", response_model=ExtractResponse, response_model_exclude_unset=True, responses=_ERRORS,
              openapi_extra=_multipart_doc("image", many=False),
              summary="3DMM coefficients, landmarks and pose of the main face in one image")
    async def extract(self, request: Request, mesh: bool = False) -> dict:
        self._authorize(request)
        uploads = await self._read_uploads(request, "image", max_count=1)
        (row,) = await self._extract(uploads, mesh=mesh)
        if row["status"] != "ok":
            code = "no_face" if row["status"] == "no_face" else "extraction_failed"
            raise ApiError(422, code, row.get("message") or code, filename=uploads[0].filename)
        body = extraction_response(row, uploads[0].filename)
        if mesh:  # opt-in: the wireframe is a few thousand numbers most clients do not want
            body["mesh"] = ({"vertices": row["mesh2d"], "triangles": await self._mesh_triangles()}
                            if row.get("mesh2d") else None)
        return body

    @api.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS,
              openapi_extra=_multipart_doc("images", many=True),
              summary="Identity (top-k), gender and per-image expressions of one person from 1..K images")
    async def predict(self, request: Request) -> dict:
        self._authorize(request)
        uploads = await self._read_uploads(request, "images", max_count=self.settings.max_images)
        if self.recognizer is None:
            raise ApiError(503, "not_configured", "no recognition models: start the server with models_uri")
        rows = await self._extract(uploads)
        if not any(row["status"] == "ok" for row in rows):
            raise ApiError(422, "no_face", "no face found in any of the images: "
                           + "; ".join(f"#{i}: {row.get('message')}" for i, row in enumerate(rows)))
        prediction = await self.recognizer.predict.remote(rows)
        return prediction_response(prediction, rows, uploads)


# ---- builders and the `facedist serve` entry point -------------------------------------------

def _gpus_per_replica(settings: ServeSettings) -> float:
    if settings.num_gpus is not None:
        return settings.num_gpus
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        return 0.5
    return 0.0


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for `serve run serve.app:build_app key=value ...` and serve/config.yaml."""
    from facedist.extractors import landmark_source_for

    s = ServeSettings.from_args(args)
    landmark_source_for(s.backend, s.landmarks)  # a combination no backend takes fails here, not in replicas
    if s.num_replicas is not None:
        scaling: dict[str, Any] = {"num_replicas": s.num_replicas}
    else:
        scaling = {"autoscaling_config": {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s}}
    actor = {"num_cpus": s.extractor_num_cpus}
    gpus = _gpus_per_replica(s)
    if gpus:
        actor["num_gpus"] = gpus
    if s.max_replicas_per_node is not None:
        scaling["max_replicas_per_node"] = s.max_replicas_per_node
    extractor = FaceExtractor.options(
        ray_actor_options=actor,
        # Room for a full batch plus the next one queuing, or batches could never fill.
        max_ongoing_requests=max(4 * s.max_batch_size, 32),
        **scaling,
    ).bind(s.backend, s.detector, s.landmarks, s.device, s.max_batch_size, s.batch_wait_timeout_s,
           s.detect_threads or max(1, int(s.extractor_num_cpus)), max(1, round(s.extractor_num_cpus)), s.max_side)
    # Always part of the app (so one config.yaml fits both cases); without models it loads nothing.
    recognizer = FaceRecognizer.options(
        ray_actor_options={"num_cpus": s.recognizer_num_cpus},
        max_ongoing_requests=max(4 * s.predict_max_batch_size, 32),
    ).bind(s.models_uri, s.backend, s.top_k, s.predict_max_batch_size, s.predict_batch_wait_timeout_s)
    return FacedistAPI.options(ray_actor_options={"num_cpus": s.ingress_num_cpus}).bind(
        extractor, recognizer, dataclasses.asdict(s))


def run_server(models_uri: str | None = None, *, address: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
               name: str = "facedist", blocking: bool = True, **settings: Any):
    """`facedist serve`: start the app on a Ray cluster (address) or an embedded local one.

    settings: any ServeSettings field (backend, max_batch_size, max_replicas, ...)."""
    import ray

    if not ray.is_initialized():
        # Replicas import this module (and facedist): locally the repository root goes on their
        # path; a remote cluster gets the repository uploaded as the job's working_dir.
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if address is None:
            runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": _with_path(repo_root)}}
        else:
            runtime_env = {"working_dir": repo_root, "env_vars": {},
                           "excludes": [".venv", ".git", "benchmarks/results", "out", "results", "runs",
                                        "*.pth", "*.pt", "*.parquet"]}
        for key in (API_TOKEN_ENV, "FACEDIST_MODEL_DIR", "FACEDIST_CACHE_DIR"):
            if os.environ.get(key):
                runtime_env["env_vars"][key] = os.environ[key]
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app({"models_uri": models_uri, **settings}), name=name,
                       route_prefix=route_prefix, blocking=False)
    logger.info("facedist serving on http://%s:%d%s (docs at /docs)", host, port, route_prefix)
    if blocking:
        import signal

        # SIGTERM (a service manager, `kill`) shuts down like Ctrl-C: no orphaned local Ray.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
            if address is None:
                ray.shutdown()
    return handle


def _with_path(root: str) -> str:
    current = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{current}" if current else root
