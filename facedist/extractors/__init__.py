"""Coefficient extractors behind one interface (see base.FaceExtractor): detector + regressor."""

from __future__ import annotations

from facedist import SettingsError
from facedist.detection import DEFAULT_DETECTOR, DETECTORS
from facedist.extractors.base import ExtractionResult, Extractor, FaceExtractor
from facedist.extractors.landmark_sources import LANDMARK_SOURCES

BACKENDS = ("tddfa", "deep3d", "fit")
# Where each backend's 68 landmarks come from unless told: tddfa regresses its own; the others
# run dlib's predictor on the detector's box.
DEFAULT_LANDMARKS = {"tddfa": "tddfa", "deep3d": "dlib", "fit": "dlib"}


def landmark_source_for(backend: str, landmarks: str | None) -> str:
    """The landmark source a backend will use; a choice that backend cannot take is a SettingsError
    (raised before any model loads, so a CLI can fail early)."""
    if backend not in BACKENDS:
        raise SettingsError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    chosen = landmarks or DEFAULT_LANDMARKS[backend]
    if chosen not in LANDMARK_SOURCES:
        raise SettingsError(f"unknown landmark source {chosen!r}; choose one of {', '.join(LANDMARK_SOURCES)}")
    if backend == "tddfa" and chosen != "tddfa":
        raise SettingsError(f"the tddfa backend takes its landmarks from its own regression, not {chosen!r}; "
                         "use --backend fit or deep3d for a landmark predictor")
    return chosen


def make_extractor(backend: str, *, detector=DEFAULT_DETECTOR, landmarks: str | None = None,
                   device: str = "cpu", **kwargs) -> FaceExtractor:
    """Build an extractor; its models load here, once (call this once per worker). detector and
    landmarks may also be ready objects (shared between extractors)."""
    source = landmarks if landmarks is not None and not isinstance(landmarks, str) else \
        landmark_source_for(backend, landmarks)
    if isinstance(detector, str) and detector not in DETECTORS:
        raise SettingsError(f"unknown face detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    if backend == "tddfa":
        from facedist.extractors.tddfa import TDDFAExtractor
        return TDDFAExtractor(detector=detector, device=device, **kwargs)
    if backend == "deep3d":
        from facedist.extractors.deep3d import Deep3DExtractor
        return Deep3DExtractor(detector=detector, device=device, landmarks=source, **kwargs)
    from facedist.extractors.fit import LandmarkFitExtractor
    return LandmarkFitExtractor(detector=detector, device=device, landmarks=source, **kwargs)


__all__ = ["BACKENDS", "DEFAULT_LANDMARKS", "DETECTORS", "ExtractionResult", "Extractor", "FaceExtractor",
           "LANDMARK_SOURCES", "landmark_source_for", "make_extractor"]
