"""Model resolution: model dir, then cache, then a pinned download checked by sha256."""

import functools
import hashlib
import http.server
import threading

import pytest

from facedist import assets
from facedist.cli import main


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _pin(monkeypatch, relpath, url, data):
    spec = assets.ModelFile(relpath, url, hashlib.sha256(data).hexdigest(), "test", "test file")
    monkeypatch.setitem(assets.MODEL_FILES, relpath, spec)


def test_model_dir_wins(monkeypatch, tmp_path):
    (tmp_path / "m" / "tddfa").mkdir(parents=True)
    (tmp_path / "m" / "tddfa" / "mb05_120x120.pth").write_bytes(b"x")
    monkeypatch.setenv(assets.MODEL_DIR_ENV, str(tmp_path / "m"))
    monkeypatch.setenv(assets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    assert assets.resolve("tddfa/mb05_120x120.pth") == tmp_path / "m" / "tddfa" / "mb05_120x120.pth"


def test_pinned_download_into_cache(monkeypatch, tmp_path, http_root):
    root, url = http_root
    data = b"pretend weights" * 100
    (root / "w.pth").write_bytes(data)
    _pin(monkeypatch, "tddfa/test_w.pth", f"{url}/w.pth", data)
    monkeypatch.delenv(assets.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv(assets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = assets.resolve("tddfa/test_w.pth")
    assert path == tmp_path / "cache" / "tddfa" / "test_w.pth"
    assert path.read_bytes() == data
    (root / "w.pth").unlink()  # second resolve comes from the cache, not the server
    assert assets.resolve("tddfa/test_w.pth") == path


def test_download_with_wrong_hash_is_refused(monkeypatch, tmp_path, http_root):
    root, url = http_root
    (root / "w.pth").write_bytes(b"tampered")
    _pin(monkeypatch, "tddfa/test_w.pth", f"{url}/w.pth", b"original")
    monkeypatch.delenv(assets.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv(assets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(assets.ModelNotFoundError, match="sha256"):
        assets.resolve("tddfa/test_w.pth")
    assert not (tmp_path / "cache" / "tddfa" / "test_w.pth").exists()


def test_unreachable_download_says_how_to_provide(monkeypatch, tmp_path, http_root):
    _, url = http_root
    _pin(monkeypatch, "tddfa/test_w.pth", f"{url}/missing.pth", b"x")
    monkeypatch.delenv(assets.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv(assets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(assets.ModelNotFoundError, match=assets.MODEL_DIR_ENV):
        assets.resolve("tddfa/test_w.pth")


def test_user_supplied_file_is_never_downloaded(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(assets.MODEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(assets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(assets.ModelNotFoundError, match="user-supplied"):
        assets.download("deep3d/epoch_20.pth")
    assert main(["models", "resolve", "deep3d/epoch_20.pth"]) == 1
    assert "not found" in capsys.readouterr().err


def test_shared_models_are_pinned_correctly():
    """The sha256 pins match the development copies in ../shared/models."""
    root = assets.model_dir()
    for relpath, spec in assets.MODEL_FILES.items():
        if spec.sha256 and (root / relpath).is_file():
            assert assets.sha256_of(root / relpath) == spec.sha256, relpath


def test_relative_model_dir_is_pinned_for_ray_workers(tmp_path):
    """Ray Train workers run in their own directories: a relative model dir given by the user is
    made absolute (against the user's cwd) as soon as facedist is imported in the driver."""
    import subprocess
    import sys

    (tmp_path / "models").mkdir()
    code = "import os, facedist; print(os.environ['FACEDIST_MODEL_DIR'])"
    env = {**__import__("os").environ, "FACEDIST_MODEL_DIR": "models"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == str(tmp_path / "models")


def _empty_model_dir(monkeypatch, tmp_path):
    """A model dir without texture/ (so the package's copy is the one found) and an empty cache."""
    monkeypatch.setenv(assets.MODEL_DIR_ENV, str(tmp_path / "models"))
    monkeypatch.setenv(assets.CACHE_DIR_ENV, str(tmp_path / "cache"))


def test_shipped_texture_basis_resolves_to_the_package_and_matches_its_pin(monkeypatch, tmp_path):
    from facedist.texture import TextureBasis

    _empty_model_dir(monkeypatch, tmp_path)
    spec = assets.MODEL_FILES[assets.DEFAULT_TEXTURE_BASIS_FILE]
    path = assets.resolve(spec.relpath, allow_download=False)
    assert path == assets.PACKAGE_DIR / spec.packaged
    assert assets.sha256_of(path) == spec.sha256
    assert spec.licence.startswith("CC BY 4.0") and "DeBruine & Jones 2017" in spec.licence
    basis = TextureBasis.load(str(path))
    assert basis.n_components == 80 and basis.n_train == 204  # London's 204 photos
    # A copy under the model dir overrides the package's.
    override = tmp_path / "models" / spec.relpath
    override.parent.mkdir(parents=True)
    override.write_bytes(path.read_bytes())
    assert assets.resolve(spec.relpath) == override


def test_an_altered_or_missing_packaged_copy_is_refused(monkeypatch, tmp_path):
    _empty_model_dir(monkeypatch, tmp_path)
    spec = assets.MODEL_FILES[assets.DEFAULT_TEXTURE_BASIS_FILE]
    package = tmp_path / "package"
    altered = package / spec.packaged
    altered.parent.mkdir(parents=True)
    data = bytearray((assets.PACKAGE_DIR / spec.packaged).read_bytes())
    data[-1] ^= 1
    altered.write_bytes(bytes(data))
    monkeypatch.setattr(assets, "PACKAGE_DIR", package)
    with pytest.raises(assets.ModelNotFoundError, match="sha256"):
        assets.resolve(spec.relpath)
    altered.unlink()
    with pytest.raises(assets.ModelNotFoundError, match="missing"):
        assets.resolve(spec.relpath)
