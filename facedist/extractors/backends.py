"""Extraction backends by name: make_extractor("tddfa-fit", ...) builds the one registered here.

A new backend is one entry in _BUILTIN (or register_backend for one defined elsewhere): the class
that builds it ("module:attr", imported only when asked for, so listing names needs no torch),
where its 68 landmarks come from unless told, and whether it is fitted in 3DDFA's basis (then its
faces are sampled for texture, facedist.texture). The CLI's choices, the settings checks and
make_extractor all read this table; nothing else names the backends.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from facedist import SettingsError


@dataclass(frozen=True)
class Backend:
    name: str
    # "module:attr" or a callable; called as builder(detector=, device=, landmark_source=, **kwargs)
    # (without landmark_source when own_landmarks_only) and returns a FaceExtractor.
    builder: "str | Callable"
    default_landmark_source: str
    own_landmarks_only: bool = False   # takes its landmarks from its own regression, no other source
    samples_texture: bool = False      # fitted in 3DDFA's basis: texture is sampled on its mesh

    def build(self, *, detector, device: str, landmark_source, **kwargs):
        builder = self.builder
        if isinstance(builder, str):
            module, _, attr = builder.partition(":")
            builder = getattr(importlib.import_module(module), attr)
        if self.own_landmarks_only:
            return builder(detector=detector, device=device, **kwargs)
        return builder(detector=detector, device=device, landmark_source=landmark_source, **kwargs)


_BUILTIN = {b.name: b for b in (
    # 3DDFA_V2's basis fitted to dlib's 68 points, warm-started from 3DDFA_V2's regression (the default)
    Backend("tddfa-fit", "facedist.extractors.fit:TDDFAFitExtractor", "dlib", samples_texture=True),
    # 3DDFA_V2's MobileNet regression (two passes), its own landmarks
    Backend("tddfa", "facedist.extractors.tddfa:TDDFAExtractor", "tddfa", own_landmarks_only=True,
            samples_texture=True),
    # Deep3DFaceRecon's ResNet-50 (80 identity, 64 expression, 80 texture coefficients)
    Backend("deep3d", "facedist.extractors.deep3d:Deep3DExtractor", "dlib"),
    # 3DDFA_V2's basis fitted to the 68 points alone
    Backend("fit", "facedist.extractors.fit:LandmarkFitExtractor", "dlib", samples_texture=True),
)}
_REGISTERED: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make a backend available to make_extractor, the CLI and the server under its name."""
    if backend.name in _BUILTIN or backend.name in _REGISTERED:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTERED[backend.name] = backend
    return backend


def list_backends() -> tuple[str, ...]:
    return (*_BUILTIN, *_REGISTERED)


def get_backend(name: str) -> Backend:
    found = _REGISTERED.get(name) or _BUILTIN.get(name)
    if found is None:
        raise SettingsError(f"unknown backend {name!r}; choose one of {', '.join(list_backends())}")
    return found


def texture_backends() -> tuple[str, ...]:
    """The backends whose faces are sampled for texture (the texture basis applies to them)."""
    return tuple(name for name in list_backends() if get_backend(name).samples_texture)


def default_landmark_sources() -> dict[str, str]:
    return {name: get_backend(name).default_landmark_source for name in list_backends()}
