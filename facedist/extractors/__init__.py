"""Coefficient extractors behind one interface (see base.Extractor)."""

from __future__ import annotations

from facedist.extractors.base import ExtractionResult, Extractor

BACKENDS = ("tddfa", "deep3d", "fit")


def make_extractor(backend: str, *, landmarks: str = "dlib", device: str = "cpu", **kwargs) -> Extractor:
    """Build an extractor; its models load here, once (call this once per worker)."""
    if backend == "tddfa":
        from facedist.extractors.tddfa import TDDFAExtractor
        return TDDFAExtractor(landmarks=landmarks, device=device, **kwargs)
    if backend == "deep3d":
        from facedist.extractors.deep3d import Deep3DExtractor
        return Deep3DExtractor(landmarks=landmarks, device=device, **kwargs)
    if backend == "fit":
        from facedist.extractors.fit import LandmarkFitExtractor
        return LandmarkFitExtractor(landmarks=landmarks, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "ExtractionResult", "Extractor", "make_extractor"]
