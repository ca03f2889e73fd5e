"""The extractor registry: a backend registered once is what make_extractor, the settings checks
and the CLI's choices see."""

import pytest

from facedist import SettingsError
from facedist.extractors import landmark_source_for, make_extractor, texture_basis_for
from facedist.extractors import backends
from facedist.extractors.backends import Backend, list_backends, register_backend


class _Stub:
    name = "stub"

    def __init__(self, detector, device, landmark_source, **kwargs):
        self.detector, self.device, self.landmark_source, self.kwargs = detector, device, landmark_source, kwargs


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTERED", {})


def test_a_registered_backend_is_built_checked_and_offered(registry):
    from facedist.cli import build_parser

    register_backend(Backend("stub", _Stub, "dlib"))
    assert list_backends()[-1] == "stub"
    built = make_extractor("stub", detector="dlib", texture=False, face_embedding=False, face_attributes=False,
                           batch_size=3)
    assert isinstance(built, _Stub) and built.landmark_source == "dlib" and built.kwargs == {"batch_size": 3}
    assert landmark_source_for("stub", None) == "dlib"
    assert texture_basis_for("stub", True, "default") is None  # no texture sampled: no basis applies
    with pytest.raises(SettingsError):
        texture_basis_for("stub", True, "basis.npz")
    extract = next(a for a in build_parser()._subparsers._group_actions[0].choices["extract"]._actions
                   if a.dest == "backend")
    assert "stub" in extract.choices
    with pytest.raises(ValueError):
        register_backend(Backend("tddfa", _Stub, "dlib"))


def test_an_unknown_backend_and_a_landmark_source_it_cannot_take_are_settings_errors():
    with pytest.raises(SettingsError, match="unknown backend"):
        landmark_source_for("nope", None)
    with pytest.raises(SettingsError, match="own regression"):
        landmark_source_for("tddfa", "dlib")
    assert landmark_source_for("tddfa", None) == "tddfa"
