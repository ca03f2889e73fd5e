"""The extractor interface: a batch of decoded images in, one result per image out.

An extractor is a face detector plus a regressor. FaceExtractor holds what every backend shares:
the image checks, batched detection, the no_face / several faces / too small / error rules, and
the assembly of each result; a backend supplies only fit_faces (landmarks, regression, fit).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Iterator, Protocol, Sequence

import numpy as np

from facedist.detection import FaceBox, FaceDetector
from facedist.images import as_rgb_uint8
from facedist.schema import (FACE_ATTRIBUTE_COLUMNS, NUM_LANDMARKS, STATUS_ERROR, STATUS_NO_FACE, STATUS_OK,
                             CoefficientLayout)

MIN_FACE_SIDE = 8  # px; smaller boxes give degenerate crops and no usable landmarks


@dataclass
class ExtractionResult:
    """Everything one image yields. Arrays are float32; absent parts stay None."""

    status: str = STATUS_OK
    message: str = ""
    width: int | None = None
    height: int | None = None
    num_faces: int = 0
    box: np.ndarray | None = None              # (4,) x0, y0, x1, y1
    det_score: float | None = None
    landmarks: np.ndarray | None = None        # (68, 2) detected
    landmarks_fit: np.ndarray | None = None    # (68, 2) reprojected from the coefficients
    landmark_error: float | None = None        # mean distance / inter-ocular distance
    id_coeffs: np.ndarray | None = None
    exp_coeffs: np.ndarray | None = None
    tex_coeffs: np.ndarray | None = None
    light_coeffs: np.ndarray | None = None
    yaw: float | None = None                   # degrees
    pitch: float | None = None
    roll: float | None = None
    scale: float | None = None
    translation: np.ndarray | None = None      # (3,)
    feature: np.ndarray | None = None          # pooled regressor feature
    texture: np.ndarray | None = None          # (K, 4) uint8 RGBA at the texture sampler's vertices
    face_embedding: np.ndarray | None = None   # (128,) L2-normalised (facedist.face_descriptor)
    expression_feature: np.ndarray | None = None  # (256,) face-api's nets (facedist.face_attributes)
    expression_probs: np.ndarray | None = None    # (7,) in FACEAPI_EXPRESSIONS order
    faceapi_age: float | None = None              # years (face-api's estimate)
    faceapi_gender_male: float | None = None      # probability (face-api's)
    extras: dict = field(default_factory=dict)  # backend-specific, not stored (e.g. vertices for previews)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @classmethod
    def error(cls, message: str, **kw) -> "ExtractionResult":
        return cls(status=STATUS_ERROR, message=message, **kw)

    @classmethod
    def no_face(cls, message: str = "no face detected", **kw) -> "ExtractionResult":
        return cls(status=STATUS_NO_FACE, message=message, **kw)

    def to_row(self) -> dict:
        """Column values for facedist.schema.COEFFICIENTS_SCHEMA (labels/path added by the caller)."""
        row = {}
        for f in fields(self):
            if f.name == "extras":
                continue
            value = getattr(self, f.name)
            if f.name == "texture" and value is not None:
                value = np.asarray(value, np.uint8).ravel().tolist()
            elif isinstance(value, np.ndarray):
                value = value.astype(np.float32).ravel().tolist()
            elif isinstance(value, (np.floating, np.integer)):
                value = value.item()
            row[f.name] = value
        return row


class Extractor(Protocol):
    """A coefficient regressor with its face detector; models are loaded once, in __init__."""

    name: str
    layout: CoefficientLayout

    def extract(self, images: Sequence[np.ndarray]) -> list[ExtractionResult]:
        """images: RGB uint8 arrays (H, W, 3). Returns exactly len(images) results, never raises
        for a single bad image: it becomes that image's error result."""
        ...


class StageTimer:
    """Accumulated wall and CPU (process) seconds per stage: CPU time stays meaningful on a
    shared, oversubscribed machine where wall time mostly measures the neighbours."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - wall
            self.cpu[name] += time.process_time() - cpu

    def clear(self) -> None:
        self.wall.clear()
        self.cpu.clear()


@dataclass
class DetectedFace:
    """The face of one image that a backend fits: the largest the detector found."""

    image: np.ndarray   # RGB uint8 (H, W, 3)
    face: FaceBox
    num_faces: int


class FaceExtractor:
    """Detector + regressor. Subclasses set name/layout and implement fit_faces."""

    name: str
    layout: CoefficientLayout

    def __init__(self, detector: FaceDetector):
        self.detector = detector
        self.timings = StageTimer()  # seconds per stage (detect, landmarks, crop, regress, ...)
        # Each coefficient group's prior standard deviation where the backend knows it ({"id": (n_id,),
        # "exp": (n_exp,)}): in_prior_units shows coefficients in those units.
        self.prior_std: dict[str, np.ndarray] = {}
        self.texture_sampler = None  # facedist.texture.TextureSampler: fills each result's texture
        self.texture_basis = None    # facedist.texture.TextureBasis: and its tex_coeffs
        self.face_descriptor = None  # facedist.face_descriptor.FaceDescriptor: fills face_embedding
        self.face_attribute_nets = None  # facedist.face_attributes.FaceAttributeNets: fill FACE_ATTRIBUTE_COLUMNS

    def enable_texture(self, sampler, basis=None) -> None:
        """Sample each fitted face's colour (and project it on a texture basis); both are part of
        the layout, so a resumed output never mixes rows with and without them."""
        from dataclasses import replace

        if basis is not None and basis.sampler_version != sampler.version:
            raise ValueError(f"texture basis was fitted on samples {basis.sampler_version}, "
                             f"this extractor samples {sampler.version}")
        self.texture_sampler, self.texture_basis = sampler, basis
        self.layout = replace(self.layout, n_tex=basis.n_components if basis else self.layout.n_tex,
                              texture=sampler.version + (f"+{basis.version}" if basis else ""),
                              n_texture_vertices=sampler.n_vertices)

    def enable_face_embedding(self, descriptor) -> None:
        """Embed each ok face with a FaceDescriptor (from its 68 landmarks); the descriptor's
        version is part of the layout, so a resumed output never mixes rows with and without it."""
        from dataclasses import replace

        self.face_descriptor = descriptor
        self.layout = replace(self.layout, face_embedding=descriptor.version)

    def in_prior_units(self, row: dict) -> dict:
        """A row's identity, expression and texture coefficients in standard deviations of the
        model's prior ({"id", "exp", "tex"}; None where the row has none or the backend states no
        prior). tex_coeffs are already in standard deviations of the texture basis."""
        out = {}
        for group, column in (("id", "id_coeffs"), ("exp", "exp_coeffs")):
            value, std = row.get(column), self.prior_std.get(group)
            out[group] = (None if value is None or std is None or len(value) != len(std)
                          else (np.asarray(value, np.float64) / std).round(4).tolist())
        out["tex"] = row.get("tex_coeffs")
        return out

    def enable_face_attributes(self, nets) -> None:
        """Fill each ok face's expression_feature, expression_probs, faceapi_age and faceapi_gender_male with
        face-api's nets (FaceAttributeNets) on the detector's box; their version is part of the
        layout, so a resumed output never mixes rows with and without them."""
        from dataclasses import replace

        self.face_attribute_nets = nets
        self.layout = replace(self.layout, face_attributes=nets.version)

    def fit_faces(self, faces: list[DetectedFace]) -> list[ExtractionResult]:
        """One result per face with the backend's parts (coefficients, landmarks, pose, feature);
        an error result for a face the backend could not fit. Detection fields are filled here."""
        raise NotImplementedError

    # ---- the batch

    def extract(self, images: Sequence[np.ndarray]) -> list[ExtractionResult]:
        results: list[ExtractionResult | None] = [None] * len(images)
        rgbs: dict[int, np.ndarray] = {}
        for i, image in enumerate(images):
            try:
                rgbs[i] = as_rgb_uint8(image)
            except ValueError as exc:
                results[i] = ExtractionResult.error(f"bad image: {exc}")
        order = list(rgbs)
        with self.timings.stage("detect"):
            found = self._detect([rgbs[i] for i in order])
        faces: list[DetectedFace] = []
        face_rows: list[int] = []
        for i, faces_i in zip(order, found):
            h, w = rgbs[i].shape[:2]
            if isinstance(faces_i, Exception):
                results[i] = ExtractionResult.error(
                    f"face detection failed: {type(faces_i).__name__}: {faces_i}", width=w, height=h)
            elif not faces_i:
                results[i] = ExtractionResult.no_face(width=w, height=h)
            else:
                x0, y0, x1, y1 = (float(v) for v in faces_i[0].box)
                if not min(x1 - x0, y1 - y0) >= MIN_FACE_SIDE:  # also catches NaN boxes
                    results[i] = ExtractionResult.error(
                        f"face box {x1 - x0:.1f} x {y1 - y0:.1f} px is too small (min {MIN_FACE_SIDE} px)",
                        width=w, height=h, num_faces=len(faces_i))
                else:
                    faces.append(DetectedFace(rgbs[i], faces_i[0], len(faces_i)))
                    face_rows.append(i)
        if faces:
            for i, face, result in zip(face_rows, faces, self._fit(faces)):
                results[i] = self._assemble(face, result)
                if self.texture_sampler is not None and results[i].ok:
                    with self.timings.stage("texture"):
                        results[i] = self._add_texture(face, results[i])
            if self.face_descriptor is not None:
                with self.timings.stage("embed"):
                    self._add_face_embeddings([(i, face) for i, face in zip(face_rows, faces)], results)
            if self.face_attribute_nets is not None:
                with self.timings.stage("attributes"):
                    self._add_face_attributes([(i, face) for i, face in zip(face_rows, faces)], results)
        return results  # type: ignore[return-value]

    def _add_face_embeddings(self, faces: list[tuple[int, DetectedFace]], results: list) -> None:
        """Each ok face's embedding, in one batched call on its detected landmarks; if the batch
        fails, face by face, and a face that still fails becomes an error row (ok rows always
        carry an embedding)."""
        todo = [(i, face) for i, face in faces if results[i].ok]
        for i, _ in todo:
            if results[i].landmarks is None or np.shape(results[i].landmarks) != (NUM_LANDMARKS, 2):
                results[i] = self._embedding_error(results[i], f"no {NUM_LANDMARKS} landmarks to align the face by")
        todo = [(i, face) for i, face in todo if results[i].ok]
        if not todo:
            return
        try:
            embeddings = list(self.face_descriptor.embed([face.image for _, face in todo],
                                                         [results[i].landmarks for i, _ in todo]))
        except Exception:
            embeddings = []
            for i, face in todo:
                try:
                    embeddings.append(self.face_descriptor.embed([face.image], [results[i].landmarks])[0])
                except Exception as exc:  # this face's error, not the batch's
                    embeddings.append(exc)
        for (i, _), embedding in zip(todo, embeddings):
            if isinstance(embedding, Exception):
                results[i] = self._embedding_error(results[i], f"{type(embedding).__name__}: {embedding}")
            elif not np.all(np.isfinite(embedding)):
                results[i] = self._embedding_error(results[i], "not finite")
            else:
                results[i].face_embedding = np.asarray(embedding, np.float32)

    @staticmethod
    def _embedding_error(result: ExtractionResult, message: str) -> ExtractionResult:
        return ExtractionResult.error(f"face embedding failed: {message}", width=result.width, height=result.height,
                                      num_faces=result.num_faces, box=result.box, det_score=result.det_score)

    def _add_face_attributes(self, faces: list[tuple[int, DetectedFace]], results: list) -> None:
        """Each ok face's attributes, in one batched call on the detector's boxes; if the batch
        fails, face by face, and a face that still fails becomes an error row (ok rows always
        carry all four)."""
        todo = [(i, face) for i, face in faces if results[i].ok]
        if not todo:
            return
        nets = self.face_attribute_nets
        try:
            out = nets.predict([face.image for _, face in todo], [results[i].box for i, _ in todo])
            per_face = [{k: v[j] for k, v in out.items()} for j in range(len(todo))]
        except Exception:
            per_face = []
            for i, face in todo:
                try:
                    one = nets.predict([face.image], [results[i].box])
                    per_face.append({k: v[0] for k, v in one.items()})
                except Exception as exc:  # this face's error, not the batch's
                    per_face.append(exc)
        for (i, _), got in zip(todo, per_face):
            if isinstance(got, Exception):
                results[i] = self._attributes_error(results[i], f"{type(got).__name__}: {got}")
                continue
            values = {name: np.asarray(got[name], np.float32) for name in FACE_ATTRIBUTE_COLUMNS}
            if not all(np.all(np.isfinite(v)) for v in values.values()):
                results[i] = self._attributes_error(results[i], "not finite")
                continue
            for name, value in values.items():
                setattr(results[i], name, value if value.ndim else float(value))

    @staticmethod
    def _attributes_error(result: ExtractionResult, message: str) -> ExtractionResult:
        return ExtractionResult.error(f"face attributes failed: {message}", width=result.width, height=result.height,
                                      num_faces=result.num_faces, box=result.box, det_score=result.det_score)

    def _add_texture(self, face: DetectedFace, result: ExtractionResult) -> ExtractionResult:
        """The face's colour at the sampler's vertices (and tex_coeffs), from the fitted mesh."""
        camera = result.extras.get("camera")
        if camera is None or result.extras.get("basis") != self.texture_sampler.model.name:
            return result  # fitted in another basis (deep3d): its own texture, if any
        try:
            result.texture = self.texture_sampler.sample(face.image, result.id_coeffs, result.exp_coeffs, camera)
            if self.texture_basis is not None:
                result.tex_coeffs = self.texture_basis.project(result.texture[None])[0]
        except Exception as exc:  # this face's error, not the batch's
            return ExtractionResult.error(f"texture sampling failed: {type(exc).__name__}: {exc}",
                                          width=result.width, height=result.height, num_faces=result.num_faces,
                                          box=result.box, det_score=result.det_score)
        return result

    def _detect(self, rgbs: list[np.ndarray]) -> list[list[FaceBox] | Exception]:
        """The batch in one call; if that fails, image by image, so the failure lands on the image
        that caused it."""
        if not rgbs:
            return []
        try:
            found = self.detector.detect_batch(rgbs)
            if len(found) != len(rgbs):
                raise RuntimeError(f"detector returned {len(found)} results for {len(rgbs)} images")
            return list(found)
        except Exception:
            out: list[list[FaceBox] | Exception] = []
            for rgb in rgbs:
                try:
                    out.append(self.detector.detect_batch([rgb])[0])
                except Exception as exc:  # this image's error, not the batch's
                    out.append(exc)
            return out

    def _fit(self, faces: list[DetectedFace]) -> list[ExtractionResult]:
        """fit_faces over the batch; if the batch call fails, face by face (same rule as _detect)."""
        try:
            got = self.fit_faces(faces)
            if len(got) != len(faces):
                raise RuntimeError(f"{self.name} returned {len(got)} results for {len(faces)} faces")
            return got
        except Exception:
            out = []
            for face in faces:
                try:
                    out.append(self.fit_faces([face])[0])
                except Exception as exc:
                    out.append(ExtractionResult.error(f"{self.name} failed: {type(exc).__name__}: {exc}"))
            return out

    @staticmethod
    def _assemble(face: DetectedFace, result: ExtractionResult) -> ExtractionResult:
        """The detection fields, the landmark error, and a last check that nothing is non-finite."""
        h, w = face.image.shape[:2]
        result.width, result.height, result.num_faces = w, h, face.num_faces
        result.box = np.asarray(face.face.box, np.float32)
        result.det_score = float(face.face.score)
        if not result.ok:
            return result
        if result.landmark_error is None and result.landmarks is not None and result.landmarks_fit is not None:
            result.landmark_error = landmark_error(result.landmarks_fit, result.landmarks)
        bad = [name for name in ("id_coeffs", "exp_coeffs", "tex_coeffs", "light_coeffs", "feature",
                                 "landmarks", "landmarks_fit", "translation")
               if getattr(result, name) is not None and not np.all(np.isfinite(getattr(result, name)))]
        if bad:
            return ExtractionResult.error(f"{', '.join(bad)} not finite", width=w, height=h,
                                          num_faces=face.num_faces, box=result.box, det_score=result.det_score)
        return result


def interocular_distance(landmarks: np.ndarray) -> float:
    """Distance between the outer eye corners of 68 iBUG points (36 and 45)."""
    return float(np.linalg.norm(landmarks[36] - landmarks[45]))


def landmark_error(fit: np.ndarray, detected: np.ndarray) -> float:
    """Mean point distance normalised by the inter-ocular distance of the detected points."""
    iod = max(interocular_distance(detected), 1e-6)
    return float(np.linalg.norm(fit[:, :2] - detected[:, :2], axis=1).mean() / iod)
