"""Coefficient extractors behind one interface (see base.FaceExtractor): detector + regressor."""

from __future__ import annotations

from facedist import SettingsError
from facedist.detection import DEFAULT_DETECTOR, DETECTORS
from facedist.extractors.base import ExtractionResult, Extractor, FaceExtractor
from facedist.extractors.landmark_sources import LANDMARK_SOURCES

BACKENDS = ("tddfa-fit", "tddfa", "deep3d", "fit")
DEFAULT_BACKEND = "tddfa-fit"
# Backends fitted in 3DDFA's basis, whose faces are sampled for texture (facedist.texture);
# deep3d regresses its own texture coefficients.
TEXTURE_BACKENDS = ("tddfa-fit", "tddfa", "fit")
# The texture basis unless told: "default" is the basis the package ships (facedist.assets
# DEFAULT_TEXTURE_BASIS_FILE), taken by the texture backends only; None (flag value "none"): no
# tex_coeffs, the sampled texture only.
DEFAULT_TEXTURE_BASIS = "default"
# Where each backend's 68 landmarks come from unless told: tddfa regresses its own; the others
# run dlib's predictor on the detector's box.
DEFAULT_LANDMARKS = {"tddfa-fit": "dlib", "tddfa": "tddfa", "deep3d": "dlib", "fit": "dlib"}


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
                   device: str = "cpu", texture: bool = True, texture_basis=DEFAULT_TEXTURE_BASIS,
                   face_embedding=True, face_attributes=True, **kwargs) -> FaceExtractor:
    """Build an extractor; its models load here, once (call this once per worker). detector and
    landmarks may also be ready objects (shared between extractors). texture: sample each face's
    colour on the fitted 3DDFA mesh (facedist.texture); texture_basis (a TextureBasis, its URI,
    DEFAULT_TEXTURE_BASIS or None) also fills tex_coeffs. face_embedding: fill each ok row's
    face_embedding with dlib's face descriptor (facedist.face_descriptor), True or a ready
    FaceDescriptor (shared), False: not. face_attributes: fill each ok row's expression_feature,
    expression_probs, faceapi_age and faceapi_gender_male with face-api's nets on the detector's box
    (facedist.face_attributes; every backend), True or ready FaceAttributeNets, False: not."""
    texture_basis = texture_basis_for(backend, texture, texture_basis)
    if isinstance(texture_basis, str):
        from facedist.texture import TextureBasis
        texture_basis = TextureBasis.load(texture_basis)
    extractor = _make_regressor(backend, detector, landmarks, device, **kwargs)
    if texture and backend in TEXTURE_BACKENDS:
        from facedist.texture import TextureSampler
        try:
            extractor.enable_texture(TextureSampler(extractor.model), texture_basis)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    if face_embedding:
        from facedist.face_descriptor import FaceDescriptor
        extractor.enable_face_embedding(FaceDescriptor(device=device) if face_embedding is True else face_embedding)
    if face_attributes:
        from facedist.face_attributes import FaceAttributeNets
        extractor.enable_face_attributes(FaceAttributeNets(device=device) if face_attributes is True
                                         else face_attributes)
    return extractor


def texture_basis_for(backend: str, texture: bool, basis):
    """The basis an extractor will project on (a TextureBasis or its URI), or None; nothing loads.
    The default applies where texture is sampled (deep3d regresses its own); a basis asked for
    by name where none can apply is a SettingsError (raised before any model loads)."""
    if isinstance(basis, str) and basis.strip().lower() == "none":
        return None
    if isinstance(basis, str) and basis == DEFAULT_TEXTURE_BASIS:
        if not (texture and backend in TEXTURE_BACKENDS):
            return None
        from facedist import assets
        return str(assets.resolve(assets.DEFAULT_TEXTURE_BASIS_FILE))
    if basis is None:
        return None
    if backend not in TEXTURE_BACKENDS:
        raise SettingsError(f"the {backend} backend does not sample texture on the 3DDFA mesh; "
                            f"a texture basis needs one of {', '.join(TEXTURE_BACKENDS)}")
    if not texture:
        raise SettingsError("a texture basis projects the sampled texture: drop --no-texture, "
                            "or use --texture-basis none")
    return basis


def _make_regressor(backend, detector, landmarks, device, **kwargs) -> FaceExtractor:
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
    if backend == "tddfa-fit":
        from facedist.extractors.fit import TDDFAFitExtractor
        return TDDFAFitExtractor(detector=detector, device=device, landmarks=source, **kwargs)
    from facedist.extractors.fit import LandmarkFitExtractor
    return LandmarkFitExtractor(detector=detector, device=device, landmarks=source, **kwargs)


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "DEFAULT_LANDMARKS", "DEFAULT_TEXTURE_BASIS", "DETECTORS", "TEXTURE_BACKENDS", "ExtractionResult", "Extractor", "FaceExtractor",
           "LANDMARK_SOURCES", "landmark_source_for", "make_extractor",
           "texture_basis_for"]
