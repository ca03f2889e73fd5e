"""3DDFA_V2 extractor: face box -> 120x120 crop -> MobileNetV1 -> 62 parameters -> 3DMM.

3DDFA_V2's own flow, no landmark detector: the first crop comes from the detector's box, the
second from the 68 landmarks reprojected from the first pass's parameters (a crop the regressor
was trained on, whatever the detector's box convention). Each pass sends all faces of the batch
through the network together, in chunks of batch_size, on a BN-folded channels-last copy of the
strictly loaded checkpoint.

Landmarks: `landmarks` holds the previous pass's 68 points (what the final crop was cut from),
`landmarks_fit` the final pass's; landmark_error, their mean distance over the inter-ocular
distance, says how far the regression moved between passes (large on faces it cannot settle).

Pose: the regressor's 3x4 camera is folded with the crop box into a pixel camera
(extras["camera"]); yaw/pitch/roll, scale (pixels per model unit) and translation (pixels) come
from its nearest scaled rotation, in facedist.morphable's convention shared by all backends.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from facedist import assets
from facedist.detection import DEFAULT_DETECTOR, make_face_detector
from facedist.extractors.base import DetectedFace, ExtractionResult, FaceExtractor, StageTimer
from facedist.models.layers import full_precision
from facedist.models.mobilenet import fuse_for_inference, load_mobilenet
from facedist.morphable import MorphableModel, Pose, affine_to_scaled_rotation, apply_affine
from facedist.schema import CoefficientLayout

CROP_SIZE = 120


# --------------------------------------------------------------------------- crop geometry


def roi_box_from_bbox(box) -> np.ndarray:
    """3DDFA_V2's parse_roi_box_from_bbox: a square 1.58x the mean side, shifted down 0.14x."""
    left, top, right, bottom = [float(v) for v in box[:4]]
    old_size = (right - left + bottom - top) / 2
    center_x = right - (right - left) / 2.0
    center_y = bottom - (bottom - top) / 2.0 + old_size * 0.14
    size = int(old_size * 1.58)
    x0, y0 = center_x - size / 2, center_y - size / 2
    return np.array([x0, y0, x0 + size, y0 + size], np.float64)


def roi_box_from_landmarks(points) -> np.ndarray:
    """3DDFA_V2's parse_roi_box_from_landmark: the landmarks' bounding square, grown to its
    diagonal (sqrt(2) x the longer side), same centre."""
    pts = np.asarray(points, np.float64)[:, :2]
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = max(x1 - x0, y1 - y0) / 2
    llength = math.sqrt(2.0) * 2 * radius
    return np.array([cx - llength / 2, cy - llength / 2, cx + llength / 2, cy + llength / 2], np.float64)


def crop_resize(image: np.ndarray, roi_box, size: int = CROP_SIZE) -> np.ndarray:
    """The roi box (rounded to whole pixels, as 3DDFA_V2's crop_img) resized to size x size
    bilinearly, zero outside the image. One warpAffine equals crop-with-padding + cv2.resize."""
    sx, sy, ex, ey = [int(round(v)) for v in roi_box]
    fx, fy = (ex - sx) / size, (ey - sy) / size
    # cv2.resize samples destination pixel centres: src = (dst + 0.5) * f - 0.5, offset by the box.
    M = np.array([[fx, 0.0, sx + 0.5 * fx - 0.5], [0.0, fy, sy + 0.5 * fy - 0.5]])
    return cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def pixel_affine(camera: np.ndarray, roi_box, size: int = CROP_SIZE) -> np.ndarray:
    """3x4 map from model points to image pixels (u, v, depth) for a 3DDFA camera P (3x4, in the
    y-up crop frame) and its roi box: 3DDFA_V2's similar_transform folded into the matrix
    (x - 1, y -> size - y, both scaled by roi size / size and offset by the box corner)."""
    sx, sy, ex, ey = [float(v) for v in roi_box]
    kx, ky = (ex - sx) / size, (ey - sy) / size
    k = (kx + ky) / 2
    P = np.asarray(camera, np.float64)
    A = np.empty((3, 4))
    A[0] = kx * P[0]
    A[0, 3] = kx * (P[0, 3] - 1) + sx
    A[1] = -ky * P[1]
    A[1, 3] = ky * (size - P[1, 3]) + sy
    A[2] = k * P[2]
    A[2, 3] = k * (P[2, 3] - 1)
    return A


def pose_from_affine(A: np.ndarray) -> Pose:
    """Nearest scaled rotation of a pixel-space affine camera (3DDFA_V2's P2sRt, in pixels)."""
    # Undo the image y flip so the rotation is in the model's y-up convention.
    scale, R = affine_to_scaled_rotation(np.stack([A[0, :3], -A[1, :3]]))
    return Pose(R, scale, A[:, 3].copy())


# --------------------------------------------------------------------------- the regressor


@dataclass
class TDDFAFit:
    """One face through 3DDFA_V2's passes."""

    params: np.ndarray        # (62,) de-normalised: camera 12, identity 40, expression 10
    feature: np.ndarray       # pooled regressor feature
    roi_box: np.ndarray       # the final crop's box
    camera: np.ndarray        # (3, 4) pixel affine camera
    points: np.ndarray        # (68, 3) final landmarks in pixels (x, y, depth)
    previous: np.ndarray      # (68, 2) the landmarks the final crop was cut from


class TDDFARegressor:
    """3DDFA_V2's MobileNetV1 and its two-pass flow, for a batch of images with one box each.

    Also a landmark predictor (predict_batch), so other backends can take their 68 points from it."""

    name = "tddfa"

    def __init__(self, device: str = "cpu", *, checkpoint: str = "tddfa/mb05_120x120.pth",
                 batch_size: int | None = None, passes: int = 2, num_threads: int | None = None,
                 timings: StageTimer | None = None):
        self.device = torch.device(device)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.path = assets.resolve(checkpoint)
        self.net = load_mobilenet(self.path, device=self.device)  # the checkpoint, loaded strictly
        self.infer_net = fuse_for_inference(self.net)               # BN folded, channels-last: what runs
        with open(assets.resolve("tddfa/param_mean_std_62d_120x120.pkl"), "rb") as fh:
            stats = pickle.load(fh)
        self.param_mean = np.asarray(stats["mean"], np.float32)
        self.param_std = np.asarray(stats["std"], np.float32)
        self.model = MorphableModel.from_tddfa()
        # crops per forward: on CPU 16-32 keep the activations in cache (benchmarks/extract_single.py
        # measures it); a GPU wants large batches.
        self.batch_size = batch_size or (16 if self.device.type == "cpu" else 256)
        self.passes = max(1, passes)
        self.timings = timings or StageTimer()
        self.version = f"3ddfa_v2_{self.path.stem}:{assets.sha256_of(self.path)[:12]}"

    @torch.inference_mode()
    def regress(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 120, 120, 3) BGR uint8 crops -> de-normalised (B, 62) parameters and (B, F) features."""
        params, feats = [], []
        for i in range(0, len(crops), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[i:i + self.batch_size])).to(self.device)
            # NHWC bytes viewed as NCHW in channels-last memory: no copy before the first conv
            x = (x.permute(0, 3, 1, 2).float() - 127.5) / 128.0
            with full_precision():
                p, f = self.infer_net.forward_with_features(x.contiguous(memory_format=torch.channels_last))
            params.append(p.cpu().numpy())
            feats.append(f.cpu().numpy())
        params = np.concatenate(params) * self.param_std + self.param_mean
        return params.astype(np.float32), np.concatenate(feats).astype(np.float32)

    @staticmethod
    def camera_and_coeffs(param: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split 62 parameters: camera (3, 4), identity (40,), expression (10,)."""
        return param[:12].reshape(3, 4), param[12:52], param[52:62]

    def reconstruct(self, param: np.ndarray, roi_box) -> tuple[np.ndarray, np.ndarray]:
        """68 landmarks in pixels (68, 3) and the pixel affine camera for one face."""
        camera, id_coeffs, exp_coeffs = self.camera_and_coeffs(param)
        A = pixel_affine(camera, roi_box)
        return apply_affine(self.model.landmarks(id_coeffs, exp_coeffs), A), A

    def _crops(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> np.ndarray:
        with self.timings.stage("crop"):
            # RGB -> BGR: the regressor was trained on OpenCV's channel order.
            return np.stack([crop_resize(img, box)[:, :, ::-1] for img, box in zip(images, boxes)])

    def fit(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[TDDFAFit]:
        """Every face through the passes together: one batched forward per pass."""
        roi_boxes = [roi_box_from_bbox(box) for box in boxes]
        previous = [None] * len(images)
        for pass_index in range(self.passes):
            crops = self._crops(images, roi_boxes)
            with self.timings.stage("regress"):
                params, feats = self.regress(crops)
            with self.timings.stage("reconstruct"):
                points = [self.reconstruct(p, box) for p, box in zip(params, roi_boxes)]
            if pass_index + 1 < self.passes:
                previous = [pts[:, :2] for pts, _ in points]
                roi_boxes = [roi_box_from_landmarks(pts) for pts, _ in points]
        return [TDDFAFit(p, f, np.asarray(box, np.float32), A, pts,
                         pts[:, :2] if prev is None else prev)
                for p, f, box, (pts, A), prev in zip(params, feats, roi_boxes, points, previous)]

    def predict_batch(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The final pass's 68 landmarks (x, y) per face."""
        return [fit.points[:, :2].astype(np.float32) for fit in self.fit(images, boxes)]


# --------------------------------------------------------------------------- the extractor


class TDDFAExtractor(FaceExtractor):
    """A face detector (FaceBoxes by default, as 3DDFA_V2) + 3DDFA_V2's regressor and passes."""

    name = "tddfa"

    def __init__(self, detector=DEFAULT_DETECTOR, device: str = "cpu", *,
                 checkpoint: str = "tddfa/mb05_120x120.pth", batch_size: int | None = None,
                 passes: int = 2, num_threads: int | None = None, with_vertices: bool = False,
                 detect_threads: int = 1):
        super().__init__(make_face_detector(detector, device, threads=detect_threads))
        self.regressor = TDDFARegressor(device, checkpoint=checkpoint, batch_size=batch_size, passes=passes,
                                        num_threads=num_threads, timings=self.timings)
        self.model = self.regressor.model
        # The 300W-LP statistics the regressor de-normalises with: 12 pose, then identity, then expression.
        std = self.regressor.param_std.astype(np.float64)[12:]
        self.prior_std = {"id": std[:self.model.n_id], "exp": std[self.model.n_id:]}
        self.with_vertices = with_vertices
        self.layout = CoefficientLayout(
            backend="tddfa", n_id=self.model.n_id, n_exp=self.model.n_exp,
            n_feature=self.regressor.net.num_features, model_name=f"3ddfa_v2_{self.regressor.path.stem}",
            model_version=assets.sha256_of(self.regressor.path)[:12],
            detector=self.detector.version, landmark_source=f"tddfa-{self.regressor.passes}pass")

    def fit_faces(self, faces: list[DetectedFace]) -> list[ExtractionResult]:
        fits = self.regressor.fit([f.image for f in faces], [f.face.box for f in faces])
        with self.timings.stage("reconstruct"):
            return [self._result(fit) for fit in fits]

    def _result(self, fit: TDDFAFit) -> ExtractionResult:
        if not np.all(np.isfinite(fit.params)):
            return ExtractionResult.error("regressor produced non-finite parameters")
        _, id_coeffs, exp_coeffs = self.regressor.camera_and_coeffs(fit.params)
        pose = pose_from_affine(fit.camera)
        yaw, pitch, roll = pose.angles
        # camera: the exact 3x4 pixel camera (previews rebuild the mesh from it and the coefficients)
        extras = {"basis": self.model.name, "pose": pose, "camera": fit.camera, "roi_box": fit.roi_box,
                  "landmarks3d": fit.points}
        if self.with_vertices:
            extras["vertices"] = apply_affine(self.model.vertices(id_coeffs, exp_coeffs), fit.camera)
        return ExtractionResult(
            landmarks=np.asarray(fit.previous, np.float32), landmarks_fit=fit.points[:, :2].astype(np.float32),
            id_coeffs=id_coeffs.astype(np.float32), exp_coeffs=exp_coeffs.astype(np.float32),
            yaw=yaw, pitch=pitch, roll=roll, scale=pose.scale,
            translation=pose.translation3.astype(np.float32), feature=fit.feature, extras=extras)
