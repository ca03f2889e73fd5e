"""Coefficient extractors behind one interface (see base.FaceExtractor): detector + regressor.

make_extractor builds one by backend name (the names and what each takes: extractors.backends).
"""

from __future__ import annotations

from facedist import SettingsError
from facedist.detection import DEFAULT_DETECTOR, DETECTORS
from facedist.extractors.backends import get_backend, texture_backends
from facedist.extractors.base import FaceExtractor
from facedist.extractors.landmark_sources import LANDMARK_SOURCES

DEFAULT_BACKEND = "tddfa-fit"
# The texture basis unless told: "default" is the basis the package ships (facedist.assets
# DEFAULT_TEXTURE_BASIS_FILE), taken by the texture backends only; None (flag value "none"): no
# tex_coeffs, the sampled texture only.
DEFAULT_TEXTURE_BASIS = "default"


def landmark_source_for(backend: str, landmark_source: str | None) -> str:
    """The landmark source a backend will use; a choice that backend cannot take is a SettingsError
    (raised before any model loads, so a CLI can fail early)."""
    spec = get_backend(backend)  # SettingsError for an unknown name
    chosen = landmark_source or spec.default_landmark_source
    if chosen not in LANDMARK_SOURCES:
        raise SettingsError(f"unknown landmark source {chosen!r}; choose one of {', '.join(LANDMARK_SOURCES)}")
    if spec.own_landmarks_only and chosen != spec.default_landmark_source:
        raise SettingsError(f"the {backend} backend takes its landmarks from its own regression, not {chosen!r}; "
                            "use --backend fit or deep3d for a landmark predictor")
    return chosen


def make_extractor(backend: str, *, detector=DEFAULT_DETECTOR, landmark_source: str | None = None,
                   device: str = "cpu", texture: bool = True, texture_basis=DEFAULT_TEXTURE_BASIS,
                   face_embedding=True, face_attributes=True, **kwargs) -> FaceExtractor:
    """Build an extractor; its models load here, once (call this once per worker). detector and
    landmark_source may also be ready objects (shared between extractors). texture: sample each face's
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
    extractor = _make_regressor(backend, detector, landmark_source, device, **kwargs)
    if texture and get_backend(backend).samples_texture:
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
        if not (texture and get_backend(backend).samples_texture):
            return None
        from facedist import assets
        return str(assets.resolve(assets.DEFAULT_TEXTURE_BASIS_FILE))
    if basis is None:
        return None
    if not get_backend(backend).samples_texture:
        raise SettingsError(f"the {backend} backend does not sample texture on the 3DDFA mesh; "
                            f"a texture basis needs one of {', '.join(texture_backends())}")
    if not texture:
        raise SettingsError("a texture basis projects the sampled texture: drop --no-texture, "
                            "or use --texture-basis none")
    return basis


def _make_regressor(backend, detector, landmark_source, device, **kwargs) -> FaceExtractor:
    source = landmark_source if landmark_source is not None and not isinstance(landmark_source, str) else \
        landmark_source_for(backend, landmark_source)
    if isinstance(detector, str) and detector not in DETECTORS:
        raise SettingsError(f"unknown face detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    return get_backend(backend).build(detector=detector, device=device, landmark_source=source, **kwargs)
