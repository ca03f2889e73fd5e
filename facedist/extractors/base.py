"""The extractor interface: a batch of decoded images in, one result per image out."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import Iterator, Protocol, Sequence

import numpy as np

from facedist.schema import STATUS_ERROR, STATUS_NO_FACE, STATUS_OK, CoefficientLayout


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
            if isinstance(value, np.ndarray):
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


def interocular_distance(landmarks: np.ndarray) -> float:
    """Distance between the outer eye corners of 68 iBUG points (36 and 45)."""
    return float(np.linalg.norm(landmarks[36] - landmarks[45]))


def landmark_error(fit: np.ndarray, detected: np.ndarray) -> float:
    """Mean point distance normalised by the inter-ocular distance of the detected points."""
    iod = max(interocular_distance(detected), 1e-6)
    return float(np.linalg.norm(fit[:, :2] - detected[:, :2], axis=1).mean() / iod)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Regressor forwards without TF32 on CUDA, so a table extracted on GPUs matches one extracted
    on CPUs (rows from both can end up in one dataset). Costs little: detection, not the regressor,
    bounds extraction."""
    import torch

    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield
