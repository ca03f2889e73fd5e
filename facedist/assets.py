"""Model files: resolved from a model directory, else a download cache (pinned URL + sha256),
else a clear error that says how to provide them.

Layout under a model directory (what ../shared/models holds):
    tddfa/mb05_120x120.pth, tddfa/param_mean_std_62d_120x120.pkl, tddfa/bfm/*.npy,
    deep3d/similarity_Lm3D_all.mat, deep3d/epoch_20.pth (user-supplied), deep3d/BFM_model_front.mat,
    faceboxes/FaceBoxesProd.pth, texture/texture_basis_london_v1.npz (optional: the package ships it),
    faceapi/*-weights_manifest.json + faceapi/*.bin (face-api's nets)

A file the package ships (facedist/data/) resolves from the model directory when it holds one,
else from the package, whose copy must match the pinned sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MODEL_DIR_ENV = "FACEDIST_MODEL_DIR"
CACHE_DIR_ENV = "FACEDIST_CACHE_DIR"

_TDDFA_V2 = "https://github.com/cleardusk/3DDFA_V2/raw/master"
_TDDFA_V1 = "https://github.com/cleardusk/3DDFA/raw/master/train.configs"
_DEEP3D = "https://github.com/sicxu/Deep3DFaceRecon_pytorch/raw/master/BFM"
# face-api's models as the npm package @vladmandic/face-api 1.7.15 ships them (model/), pinned by version.
_FACEAPI = "https://cdn.jsdelivr.net/npm/@vladmandic/face-api@1.7.15/model"
# The face descriptor's weights are dlib's (davisking/dlib-models: released into the public domain;
# face_recognition_models ships them under CC0 1.0), ported to TF.js and uint8-quantised by face-api (MIT).
_FACEAPI_DESCRIPTOR_LICENCE = "MIT (face-api port); weights dlib's: public domain / CC0 1.0 (dlib-models)"
_FACEAPI_LICENCE = "MIT (@vladmandic/face-api 1.7.15, from face-api.js)"


@dataclass(frozen=True)
class ModelFile:
    """One model file: where it lives under the model directory and how to fetch it."""

    relpath: str
    url: str | None          # None: user-supplied, never downloaded
    sha256: str | None
    licence: str
    description: str
    packaged: str | None = None  # its copy inside the package (relative to facedist/), if one ships


PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_TEXTURE_BASIS_FILE = "texture/texture_basis_london_v1.npz"


MODEL_FILES: dict[str, ModelFile] = {
    f.relpath: f
    for f in (
        ModelFile("tddfa/mb05_120x120.pth", f"{_TDDFA_V2}/weights/mb05_120x120.pth",
                  "f93ed7f1c4c0382b16d7c18480a5f67473c1917a47475a9823924f38aeb27280",
                  "MIT (3DDFA_V2)", "3DDFA_V2 MobileNetV1 x0.5 regressor"),
        ModelFile("tddfa/mb1_120x120.pth", None, None, "MIT (3DDFA_V2)",
                  "3DDFA_V2 MobileNetV1 x1.0 regressor (optional; place it in the model directory)"),
        ModelFile("tddfa/param_mean_std_62d_120x120.pkl",
                  f"{_TDDFA_V2}/configs/param_mean_std_62d_120x120.pkl",
                  "090d7150f77cb66c29ddae21e4508fbde59123dcd1dea7facc24a7ed06d1c795",
                  "MIT (3DDFA_V2)", "normalisation of the 62 regressor outputs"),
        ModelFile("tddfa/bfm/u_shp.npy", f"{_TDDFA_V1}/u_shp.npy",
                  "8a3b8b5ba3b0526ce3ddd3e287b26e0192c150e477767f374a6e333a365ff7dd",
                  "BFM-derived: non-commercial", "mean face"),
        ModelFile("tddfa/bfm/u_exp.npy", f"{_TDDFA_V1}/u_exp.npy",
                  "69049fb360bfff61090f7705ba510ed9bd817da871edbaa69e2fed7df624cf19",
                  "BFM-derived: non-commercial", "mean expression"),
        ModelFile("tddfa/bfm/w_shp_sim.npy", f"{_TDDFA_V1}/w_shp_sim.npy",
                  "fbcfafe2de0824cb901becc6eb675461711cf4c002d61f40745c634061a7303a",
                  "BFM-derived: non-commercial", "40 identity basis vectors"),
        ModelFile("tddfa/bfm/w_exp_sim.npy", f"{_TDDFA_V1}/w_exp_sim.npy",
                  "f0919eab9093b6a4179b05020e1ce434db7c11175cdd55671a323b6df029f432",
                  "BFM-derived: non-commercial", "10 expression basis vectors"),
        ModelFile("tddfa/bfm/keypoints_sim.npy", f"{_TDDFA_V1}/keypoints_sim.npy",
                  "065053f041b03ed32e36641d26fcd9aefef36f6c518899091cdc6038a6246c13",
                  "BFM-derived: non-commercial", "indices of the 68 landmarks"),
        ModelFile("faceboxes/FaceBoxesProd.pth", f"{_TDDFA_V2}/FaceBoxes/weights/FaceBoxesProd.pth",
                  "c0cb2b1e40710c0aa5fc32a8759b1496a0fe0a126c907ca0ffe35b4bd0709d09",
                  "MIT (3DDFA_V2)", "FaceBoxes face detector (3DDFA_V2's copy)"),
        ModelFile("faceapi/face_expression_model-weights_manifest.json",
                  f"{_FACEAPI}/face_expression_model-weights_manifest.json",
                  "5b349c17c7836da506e03422cd6461c74085d8bb2713ad4114647dc5d28174c8",
                  _FACEAPI_LICENCE, "face-api FaceExpressionNet: TF.js manifest (names, shapes, uint8 scales)"),
        ModelFile("faceapi/face_expression_model.bin", f"{_FACEAPI}/face_expression_model.bin",
                  "9a9840f2cf1f4c7eab95f197512569345c00d2426754d4608b92af30e0300f3d",
                  _FACEAPI_LICENCE, "face-api FaceExpressionNet weights (7 expressions, 256-d feature)"),
        ModelFile("faceapi/age_gender_model-weights_manifest.json",
                  f"{_FACEAPI}/age_gender_model-weights_manifest.json",
                  "74b60bf3ebf981bf4e661e9cca3a185614e10b25d797118b62e2a68d3ff2569f",
                  _FACEAPI_LICENCE, "face-api AgeGenderNet: TF.js manifest (names, shapes, uint8 scales)"),
        ModelFile("faceapi/age_gender_model.bin", f"{_FACEAPI}/age_gender_model.bin",
                  "49f92bbc0afef2342c4385e4a2b0acb6d7a727c6f0aa539499719a81acf9abaa",
                  _FACEAPI_LICENCE, "face-api AgeGenderNet weights (TinyXception, age + gender heads)"),
        ModelFile("deep3d/similarity_Lm3D_all.mat", f"{_DEEP3D}/similarity_Lm3D_all.mat",
                  "53b83ce6e35c50ddc3e97603650cef4970320c157e75c241c844f29c1dcba65a",
                  "MIT (Deep3DFaceRecon_pytorch)", "standard 3D landmarks for 5-point alignment"),
        ModelFile("deep3d/epoch_20.pth", None, None, "user-supplied (Deep3DFaceRecon terms)",
                  "Deep3DFaceRecon R-Net checkpoint, key 'net_recon'"),
        ModelFile("deep3d/BFM_model_front.mat", None, None, "user-supplied (BFM licence)",
                  "Deep3DFaceRecon's BFM (80 id / 64 exp / 80 tex)"),
        ModelFile(DEFAULT_TEXTURE_BASIS_FILE, None,
                  "b95140a5f4645f992f8b5f21401e67b518bd085a1d4a347e74b1e8fe39bbd22d",
                  "CC BY 4.0 (derived from the Face Research Lab London Set, DeBruine & Jones 2017)",
                  "default texture basis: 80-component PCA of the tddfa-fit texture samples of the "
                  "London Set's 204 photos (scripts/make_texture_basis.sh)",
                  packaged="data/texture_basis_london_v1.npz"),
        ModelFile("faceapi/face_recognition_model-weights_manifest.json",
                  f"{_FACEAPI}/face_recognition_model-weights_manifest.json",
                  "cbaffa501b0b9275a12b63357a6843e7e30c054e1c9151e1a5f879b26e32986b",
                  _FACEAPI_DESCRIPTOR_LICENCE,
                  "face-api's FaceRecognitionNet (dlib's ResNet face descriptor): TF.js manifest"),
        ModelFile("faceapi/face_recognition_model.bin", f"{_FACEAPI}/face_recognition_model.bin",
                  "b413e420d6840b2775fba32008db6f3cddb07d485967fb42cfcf379c16a8c589",
                  _FACEAPI_DESCRIPTOR_LICENCE,
                  "face-api's FaceRecognitionNet weights (uint8-quantised), read through the manifest"),
    )
}


class ModelNotFoundError(FileNotFoundError):
    pass


def model_dir() -> Path | None:
    value = os.environ.get(MODEL_DIR_ENV)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    value = os.environ.get(CACHE_DIR_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "facedist" / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _how_to_provide(relpath: str) -> str:
    return (f"Model file '{relpath}' not found. Set {MODEL_DIR_ENV} to a directory that holds "
            f"'{relpath}' (e.g. {MODEL_DIR_ENV}=../shared/models), or run `facedist models download` "
            f"on a machine with network access and copy {cache_dir()} over.")


def download(relpath: str, *, timeout: float = 60.0) -> Path:
    """Fetch a pinned file into the cache, verify its sha256, and return its path."""
    spec = MODEL_FILES.get(relpath)
    if spec is None or spec.url is None:
        raise ModelNotFoundError(_how_to_provide(relpath) + " It is user-supplied: it is never downloaded.")
    target = cache_dir() / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as response, \
                tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(response, tmp)
    except OSError as exc:
        raise ModelNotFoundError(f"{_how_to_provide(relpath)} Download from {spec.url} failed: {exc}") from exc
    got = sha256_of(Path(tmp.name))
    if spec.sha256 and got != spec.sha256:
        os.unlink(tmp.name)
        raise ModelNotFoundError(f"Downloaded {spec.url} has sha256 {got}, expected {spec.sha256}; not used.")
    os.replace(tmp.name, target)
    return target


def packaged_copy(spec: ModelFile) -> Path:
    """The package's copy of a file it ships, checked against the pin."""
    path = PACKAGE_DIR / spec.packaged
    if not path.is_file():
        raise ModelNotFoundError(f"{_how_to_provide(spec.relpath)} The package's copy {path} is missing: "
                                 "reinstall facedist.")
    got = sha256_of(path)
    if spec.sha256 and got != spec.sha256:
        raise ModelNotFoundError(f"The package's copy {path} has sha256 {got}, expected {spec.sha256}; not used. "
                                 f"Reinstall facedist, or put '{spec.relpath}' under {MODEL_DIR_ENV}.")
    return path


def resolve(relpath: str, *, allow_download: bool = True) -> Path:
    """Path of a model file: model directory, then the package's copy (files it ships), then
    cache, then a pinned download."""
    root = model_dir()
    if root is not None and (root / relpath).is_file():
        return root / relpath
    spec = MODEL_FILES.get(relpath)
    if spec is not None and spec.packaged:
        return packaged_copy(spec)
    cached = cache_dir() / relpath
    if cached.is_file():
        return cached
    if allow_download and relpath in MODEL_FILES and MODEL_FILES[relpath].url:
        return download(relpath)
    raise ModelNotFoundError(_how_to_provide(relpath))


def status() -> list[dict]:
    """Where each known file resolves now (no downloads): for `facedist models`."""
    rows = []
    for relpath, spec in MODEL_FILES.items():
        try:
            where = str(resolve(relpath, allow_download=False))
        except ModelNotFoundError:
            where = None
        rows.append({"file": relpath, "path": where, "downloadable": spec.url is not None,
                     "packaged": spec.packaged is not None,
                     "sha256": spec.sha256, "licence": spec.licence, "description": spec.description})
    return rows
