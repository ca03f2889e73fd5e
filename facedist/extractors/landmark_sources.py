"""Where the fit and deep3d backends get their 68 landmarks: a predictor on the detector's box
(dlib, face-alignment) or 3DDFA_V2's regression (the tddfa backend's own landmarks)."""

from __future__ import annotations

from facedist.landmarks import LANDMARK_PREDICTORS, LandmarkPredictor, make_landmark_predictor

LANDMARK_SOURCES = ("tddfa", *LANDMARK_PREDICTORS)


def make_landmark_source(name: "str | LandmarkPredictor", device: str = "cpu") -> LandmarkPredictor:
    """A landmark source by name; a ready one passes through."""
    if not isinstance(name, str):
        return name
    if name == "tddfa":
        from facedist.extractors.tddfa import TDDFARegressor

        return TDDFARegressor(device)
    if name not in LANDMARK_PREDICTORS:
        raise ValueError(f"unknown landmark source {name!r}; choose one of {', '.join(LANDMARK_SOURCES)}")
    return make_landmark_predictor(name, device)
