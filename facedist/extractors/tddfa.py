"""3DDFA_V2 extractor: detected face -> 120x120 crop -> MobileNetV1 -> 62 parameters -> 3DMM.

Two passes as 3DDFA_V2 does for tracking: the first crop comes from the detector's box, the second
from the first pass's reprojected landmarks (a crop the regressor was trained on whatever the
detector's box convention). Each pass sends all faces of the batch through the network together,
in chunks of batch_size, on a BN-folded channels-last copy of the strictly loaded checkpoint.

Pose: the regressor's 3x4 camera is folded with the crop box into a pixel camera
(extras["camera"]); yaw/pitch/roll, scale (pixels per model unit) and translation (pixels) come
from its nearest scaled rotation, in facedist.morphable's convention shared by all backends.
"""

from __future__ import annotations

import math
import pickle
import time
from collections import defaultdict
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from facedist import assets
from facedist.extractors.base import ExtractionResult, full_precision, landmark_error
from facedist.images import as_rgb_uint8
from facedist.landmarks import make_landmark_detector, map_images
from facedist.models.mobilenet import fuse_for_inference, load_mobilenet
from facedist.morphable import MorphableModel, Pose, affine_to_scaled_rotation, apply_affine
from facedist.schema import CoefficientLayout

CROP_SIZE = 120
MIN_FACE_SIDE = 8  # px; smaller boxes give degenerate crops (3DDFA_V2's size is int(1.58 * side))


class StageTimer:
    """Accumulated wall and CPU (process) seconds per stage: CPU time stays meaningful on a
    shared, oversubscribed machine where wall time mostly measures the neighbours."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._open: dict[str, tuple[float, float]] = {}

    def start(self, stage: str) -> None:
        self._open[stage] = (time.perf_counter(), time.process_time())

    def stop(self, stage: str) -> None:
        wall, cpu = self._open.pop(stage)
        self.wall[stage] += time.perf_counter() - wall
        self.cpu[stage] += time.process_time() - cpu

    def clear(self) -> None:
        self.wall.clear()
        self.cpu.clear()


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


# --------------------------------------------------------------------------- the extractor


class TDDFAExtractor:
    """3DDFA_V2 MobileNetV1 regressor behind a 68-landmark face detector."""

    name = "tddfa"

    def __init__(self, landmarks: Any = "dlib", device: str = "cpu", *,
                 checkpoint: str = "tddfa/mb05_120x120.pth", batch_size: int | None = None,
                 passes: int = 2, num_threads: int | None = None, with_vertices: bool = False,
                 detect_threads: int = 1):
        self.detector = make_landmark_detector(landmarks, device, threads=detect_threads)
        self.device = torch.device(device)
        if num_threads:
            torch.set_num_threads(num_threads)
        path = assets.resolve(checkpoint)
        self.net = load_mobilenet(path, device=self.device)  # the checkpoint, loaded strictly
        self.infer_net = fuse_for_inference(self.net)          # BN folded, channels-last: what runs
        with open(assets.resolve("tddfa/param_mean_std_62d_120x120.pkl"), "rb") as fh:
            stats = pickle.load(fh)
        self.param_mean = np.asarray(stats["mean"], np.float32)
        self.param_std = np.asarray(stats["std"], np.float32)
        self.model = MorphableModel.from_tddfa()
        # crops per forward: on CPU 16-32 keep the activations in cache (benchmarks/extract_single.py
        # measures 1.0 ms/crop at 16 vs 1.5 at 128 on one core); a GPU wants large batches.
        self.batch_size = batch_size or (16 if self.device.type == "cpu" else 256)
        self.passes = passes
        self.with_vertices = with_vertices
        self.timings = StageTimer()  # seconds per stage (detect, crop, regress, reconstruct)
        self.layout = CoefficientLayout(
            backend="tddfa", n_id=self.model.n_shape, n_exp=self.model.n_exp,
            n_feature=self.net.num_features, model_name=f"3ddfa_v2_{path.stem}",
            model_version=assets.sha256_of(path)[:12])

    # ---- the network

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

    def camera_and_coeffs(self, param: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split 62 parameters: camera (3, 4), shape (40,), expression (10,)."""
        return param[:12].reshape(3, 4), param[12:52], param[52:62]

    def reconstruct(self, param: np.ndarray, roi_box) -> tuple[np.ndarray, np.ndarray]:
        """68 landmarks in pixels (68, 3) and the pixel affine camera for one face."""
        camera, shape, exp = self.camera_and_coeffs(param)
        A = pixel_affine(camera, roi_box)
        return apply_affine(self.model.landmarks(shape, exp), A), A

    def _crops(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> np.ndarray:
        self.timings.start("crop")
        # RGB -> BGR: the regressor was trained on OpenCV's channel order.
        crops = np.stack([crop_resize(img, box)[:, :, ::-1] for img, box in zip(images, boxes)])
        self.timings.stop("crop")
        return crops

    # ---- the batch

    def _detect(self, image: np.ndarray) -> tuple[np.ndarray | None, list | ExtractionResult]:
        """One image's faces (largest first), or the image's final result when it has none usable."""
        try:
            rgb = as_rgb_uint8(image)
        except ValueError as exc:
            return None, ExtractionResult.error(f"bad image: {exc}")
        h, w = rgb.shape[:2]
        try:
            found = self.detector.detect(rgb)
        except Exception as exc:  # one image's detector failure is that image's error
            return None, ExtractionResult.error(
                f"landmark detection failed: {type(exc).__name__}: {exc}", width=w, height=h)
        if not found:
            return None, ExtractionResult.no_face(width=w, height=h)
        x0, y0, x1, y1 = (float(v) for v in found[0].box)
        if not min(x1 - x0, y1 - y0) >= MIN_FACE_SIDE:  # also catches NaN boxes
            return None, ExtractionResult.error(
                f"face box {x1 - x0:.1f} x {y1 - y0:.1f} px is too small to crop (min {MIN_FACE_SIDE} px)",
                width=w, height=h, num_faces=len(found))
        return rgb, found

    def extract(self, images: Sequence[np.ndarray]) -> list[ExtractionResult]:
        results: list[ExtractionResult | None] = [None] * len(images)
        faces, rgbs, order = [], [], []
        self.timings.start("detect")
        # Detection is per image (and on the detector's threads when it has them); the network
        # then sees every face of the batch together.
        for i, (rgb, found) in enumerate(map_images(self.detector, self._detect, images)):
            if rgb is None:
                results[i] = found
                continue
            faces.append(found)
            rgbs.append(rgb)
            order.append(i)
        self.timings.stop("detect")
        if order:
            try:
                for i, result in zip(order, self._regress_faces(rgbs, faces)):
                    results[i] = result
            except Exception as exc:  # a failure of the batch forward: report it on each row
                for i, rgb, found in zip(order, rgbs, faces):
                    results[i] = ExtractionResult.error(
                        f"regression failed: {type(exc).__name__}: {exc}", width=rgb.shape[1],
                        height=rgb.shape[0], num_faces=len(found))
        return results  # type: ignore[return-value]

    def _regress_faces(self, rgbs: list[np.ndarray], faces: list[list]) -> list[ExtractionResult]:
        boxes = [roi_box_from_bbox(found[0].box) for found in faces]
        for pass_index in range(self.passes):
            crops = self._crops(rgbs, boxes)
            self.timings.start("regress")
            params, feats = self.regress(crops)
            self.timings.stop("regress")
            if pass_index + 1 < self.passes:
                self.timings.start("reconstruct")
                boxes = [roi_box_from_landmarks(self.reconstruct(p, box)[0]) for p, box in zip(params, boxes)]
                self.timings.stop("reconstruct")
        self.timings.start("reconstruct")
        out = [self._result(rgb, found, p, f, box) for rgb, found, p, f, box in zip(rgbs, faces, params, feats, boxes)]
        self.timings.stop("reconstruct")
        return out

    def _result(self, rgb, found, param, feature, roi_box) -> ExtractionResult:
        face = found[0]
        h, w = rgb.shape[:2]
        if not np.all(np.isfinite(param)):
            return ExtractionResult.error("regressor produced non-finite parameters", width=w, height=h,
                                          num_faces=len(found))
        _, shape, exp = self.camera_and_coeffs(param)
        points, A = self.reconstruct(param, roi_box)
        pose = pose_from_affine(A)
        yaw, pitch, roll = pose.angles
        detected = np.asarray(face.landmarks, np.float32)
        fitted = points[:, :2]
        # camera: the exact 3x4 pixel camera (previews rebuild the mesh from it and the coefficients)
        extras = {"basis": self.model.name, "pose": pose, "camera": A, "roi_box": np.asarray(roi_box, np.float32),
                  "landmarks3d": points}
        if self.with_vertices:
            extras["vertices"] = apply_affine(self.model.vertices(shape, exp), A)
        return ExtractionResult(
            width=w, height=h, num_faces=len(found),
            box=np.asarray(face.box, np.float32), det_score=float(face.score),
            landmarks=detected, landmarks_fit=fitted,
            landmark_error=landmark_error(fitted, detected),
            id_coeffs=shape.astype(np.float32), exp_coeffs=exp.astype(np.float32),
            yaw=yaw, pitch=pitch, roll=roll, scale=pose.scale,
            translation=pose.translation3.astype(np.float32),
            feature=feature, extras=extras)
