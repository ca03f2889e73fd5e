"""Deep3DFaceRecon backend: face box -> 68 landmarks -> 5-point alignment to 224 -> R-Net (ResNet-50) -> 257
coefficients (80 id, 64 exp, 80 tex, 3 angles, 27 SH lighting, 3 translation) + pooled 2048 feature.
The 68 landmarks come from a predictor on the box (dlib's by default) or from 3DDFA_V2's regression.

The R-Net weights (epoch_20.pth) are user-supplied; a missing file is a ModelNotFoundError at
construction, never a per-image failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facedist import assets
from facedist.align import AlignedFace, align_face, load_lm3d
from facedist.detection import DEFAULT_DETECTOR, make_face_detector
from facedist.extractors.base import DetectedFace, ExtractionResult, FaceExtractor
from facedist.extractors.landmark_sources import make_landmark_source
from facedist.models.layers import full_precision
from facedist.models.resnet import load_recon_net, split_coefficients
from facedist.schema import STATUS_ERROR, CoefficientLayout

DEFAULT_CHECKPOINT = "deep3d/epoch_20.pth"
DEFAULT_BFM = "deep3d/BFM_model_front.mat"
MODEL_NAME = "deep3dfacerecon_rnet_resnet50"

# Deep3DFaceRecon's camera (ParametricFaceModel defaults): perspective, focal 1015 px, principal
# point at the crop centre, the face 10 units in front of the camera.
FOCAL = 1015.0
CENTER = 112.0
CAMERA_DISTANCE = 10.0


def _resolve_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    return assets.resolve(str(checkpoint))  # raises ModelNotFoundError with how to provide it


def _load_optional_bfm(bfm: str | Path | None):
    """Deep3DFaceRecon's BFM if the user has it (its licence forbids shipping it), else None."""
    if bfm is None:
        return None
    from facedist.morphable import MorphableModel

    path = Path(bfm).expanduser()
    if not path.is_file():
        try:
            path = assets.resolve(str(bfm), allow_download=False)
        except assets.ModelNotFoundError:
            return None
    return MorphableModel.from_deep3d_mat(path)


def deep3d_rotation(angle: np.ndarray) -> np.ndarray:
    """Deep3DFaceRecon's compute_rotation: R = Rz(z) Ry(y) Rx(x), applied as R @ X."""
    x, y, z = np.asarray(angle, dtype=np.float64)
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


def project_to_crop(points3d: np.ndarray, angle: np.ndarray, trans: np.ndarray,
                    target_size: int = 224) -> np.ndarray:
    """Model-frame points (N, 3) to crop pixels (x right, y down) with Deep3DFaceRecon's pose and
    perspective camera (its renderer works y up; we flip to rows)."""
    p = np.asarray(points3d, np.float64) @ deep3d_rotation(angle).T + np.asarray(trans, np.float64)
    depth = CAMERA_DISTANCE - p[:, 2]
    uv = FOCAL * p[:, :2] / depth[:, None] + CENTER
    uv[:, 1] = target_size - 1 - uv[:, 1]
    return uv


def deep3d_angles_to_degrees(angle: np.ndarray) -> tuple[float, float, float]:
    """Deep3DFaceRecon's (x, y, z) radians, R = Rz(z) Ry(y) Rx(x), to (yaw, pitch, roll) degrees in
    facedist's shared convention R = Rz(roll) Ry(-yaw) Rx(pitch) (facedist.morphable): both use a
    model frame with x right, y up, z towards the camera, so yaw = -y."""
    x, y, z = np.rad2deg(np.asarray(angle, dtype=np.float64))
    return float(-y), float(x), float(z)


class Deep3DExtractor(FaceExtractor):
    """Deep3DFaceRecon R-Net extractor; detector, landmark source and network load once, here."""

    name = "deep3d"

    def __init__(self, detector=DEFAULT_DETECTOR, device: str = "cpu", *, landmark_source="dlib",
                 checkpoint: str | Path = DEFAULT_CHECKPOINT, batch_size: int = 16,
                 keep_crops: bool = False, bfm: str | Path | None = DEFAULT_BFM, detect_threads: int = 1):
        self.checkpoint_path = _resolve_checkpoint(checkpoint)
        super().__init__(make_face_detector(detector, device, threads=detect_threads))
        self.device = torch.device(device)
        self.model = load_recon_net(self.checkpoint_path).to(self.device)
        self.lm3d = load_lm3d()
        self.predictor = make_landmark_source(landmark_source, device)
        self.batch_size = max(1, int(batch_size))
        self.keep_crops = keep_crops  # aligned crops in result.extras (previews, raw-image baselines)
        self.bfm = _load_optional_bfm(bfm)  # only to reproject landmarks (landmarks_fit/landmark_error)
        self.layout = CoefficientLayout(
            backend=self.name, n_id=80, n_exp=64, n_tex=80, n_light=27, n_feature=2048,
            model_name=f"{MODEL_NAME}:{self.checkpoint_path.name}",
            model_version=assets.sha256_of(self.checkpoint_path)[:16],
            detector=self.detector.version, landmark_source=self.predictor.version)

    @torch.inference_mode()
    def _forward(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous().to(self.device)
        with full_precision():
            coeffs, feature = self.model.forward_with_features(batch)
        return coeffs.float().cpu().numpy(), feature.float().cpu().numpy()

    def fit_faces(self, faces: list[DetectedFace]) -> list[ExtractionResult]:
        with self.timings.stage("landmarks"):
            points = self.predictor.predict_batch([f.image for f in faces], [f.face.box for f in faces])
        results: list[ExtractionResult] = []
        pending: list[tuple[ExtractionResult, AlignedFace]] = []
        with self.timings.stage("crop"):
            for face, lm in zip(faces, points):
                result = ExtractionResult(landmarks=np.asarray(lm, np.float32)[:, :2])
                results.append(result)
                try:
                    pending.append((result, align_face(face.image, result.landmarks, self.lm3d)))
                except Exception as exc:
                    results[-1] = ExtractionResult.error(f"alignment failed: {exc}")
        with self.timings.stage("regress"):
            for start in range(0, len(pending), self.batch_size):
                self._run_batch(pending[start:start + self.batch_size])
        return results

    def _run_batch(self, pending: list[tuple[ExtractionResult, AlignedFace]]) -> None:
        try:
            coeffs, features = self._forward([aligned.crop for _, aligned in pending])
        except Exception as exc:  # e.g. out of memory: these rows fail, the job goes on
            for result, _ in pending:
                result.status, result.message = STATUS_ERROR, f"R-Net failed: {type(exc).__name__}: {exc}"
            return
        for row, (result, aligned) in enumerate(pending):
            try:
                self._fill(result, aligned, coeffs[row], features[row])
            except Exception as exc:
                result.status, result.message = STATUS_ERROR, f"coefficients failed: {type(exc).__name__}: {exc}"

    def _fill(self, result: ExtractionResult, aligned: AlignedFace, coeffs: np.ndarray,
              feature: np.ndarray) -> None:
        if not (np.isfinite(coeffs).all() and np.isfinite(feature).all()):
            result.status, result.message = STATUS_ERROR, "R-Net output is not finite"
            return
        parts = {k: v.numpy().astype(np.float32) for k, v in split_coefficients(torch.from_numpy(coeffs)).items()}
        result.id_coeffs, result.exp_coeffs = parts["id"], parts["exp"]
        result.tex_coeffs, result.light_coeffs = parts["tex"], parts["gamma"]
        result.yaw, result.pitch, result.roll = deep3d_angles_to_degrees(parts["angle"])
        result.translation = parts["trans"]
        result.feature = feature.astype(np.float32)
        result.extras["angle_rad"] = parts["angle"]
        if self.bfm is not None:
            points3d = self.bfm.landmarks(parts["id"], parts["exp"])
            crop_points = project_to_crop(points3d, parts["angle"], parts["trans"], aligned.transform.target_size)
            result.landmarks_fit = aligned.transform.crop_to_image(crop_points).astype(np.float32)
        result.extras["align_transform"] = aligned.transform
        if self.keep_crops:
            result.extras["aligned_crop"] = aligned.crop
