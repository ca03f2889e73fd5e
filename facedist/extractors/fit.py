"""Landmark-fit extractor: no network, a regularised least-squares 3DMM fit to the 68 detected points.

Alternates (1) a scaled-orthographic pose from the current 3D landmarks (affine least squares,
projected to scale x rotation) and (2) a linear ridge solve of identity and expression coefficients
given that pose. The Tikhonov term is a Gaussian prior on the coefficients (for 3DDFA's basis:
the 300W-LP mean/std the regressor was trained with) weighted by `reg` against an assumed
landmark noise, so coefficients stay near typical faces where 2-D points do not constrain them.

feature: the fit has no learned feature; it stores the normalised landmark residual
(68 x 2 = 136 values: (fit - detected) / inter-ocular distance), which says how well the model
explains this face and is cheap to aggregate.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
import numpy as np

from facedist import assets
from facedist.detection import DEFAULT_DETECTOR, make_face_detector
from facedist.extractors.base import DetectedFace, ExtractionResult, FaceExtractor, interocular_distance
from facedist.extractors.landmark_sources import make_landmark_source
from facedist.morphable import MorphableModel, Pose, affine_to_scaled_rotation
from facedist.schema import NUM_LANDMARKS, CoefficientLayout


MIN_INTEROCULAR_PX = 2.0  # below this the 68 points carry no usable geometry


@dataclass
class FitConfig:
    alternations: int = 3   # closed-form pose / linear coefficient rounds (the initialisation)
    iterations: int = 10    # joint Gauss-Newton refinements (stops early when converged)
    reg: float = 1.0         # weight of the Gaussian coefficient prior (Tikhonov); 0 = plain least squares
    noise: float = 0.03      # assumed landmark noise, as a fraction of the inter-ocular distance


@dataclass
class FitResult:
    id_coeffs: np.ndarray    # (n_id,)
    exp_coeffs: np.ndarray   # (n_exp,)
    pose: Pose               # model frame -> pixels
    points: np.ndarray       # (68, 3) projected fitted landmarks (pixels, depth)


@dataclass
class CoefficientPrior:
    """Per-coefficient Gaussian prior (identity then expression)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def tddfa(cls) -> "CoefficientPrior":
        """The 300W-LP statistics of 3DDFA's 40 identity + 10 expression parameters (the same file
        the regressor de-normalises with), so fit and regressor share one notion of "typical"."""
        with open(assets.resolve("tddfa/param_mean_std_62d_120x120.pkl"), "rb") as fh:
            stats = pickle.load(fh)
        return cls(np.asarray(stats["mean"][12:], np.float64), np.asarray(stats["std"][12:], np.float64))

    @classmethod
    def isotropic(cls, model: MorphableModel, rel_std: float = 0.15) -> "CoefficientPrior":
        """For a basis without statistics: one standard deviation of any coefficient moves the
        landmarks by rel_std of the model's inter-ocular distance (RMS)."""
        basis = np.concatenate([model.lm_id_basis, model.lm_exp_basis], axis=1).astype(np.float64)
        rms = np.sqrt((basis ** 2).sum(0) / NUM_LANDMARKS)
        iod = interocular_distance(model.lm_mean.reshape(-1, 3))
        return cls(np.zeros(basis.shape[1]), rel_std * iod / np.maximum(rms, 1e-12))


def _fit_affine(X: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Least-squares 2x4 affine camera with uv ~ A @ [X; 1]."""
    Xh = np.hstack([X, np.ones((X.shape[0], 1))])
    A, *_ = np.linalg.lstsq(Xh, uv, rcond=None)
    return A.T


def _pose_for(X: np.ndarray, uv: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Scaled-orthographic pose (scale, R, 2-D t) for 3-D points X and y-up image points uv:
    affine least squares, then its nearest scaled rotation, then the best translation for it."""
    A = _fit_affine(X, uv)
    scale, R = affine_to_scaled_rotation(A[:, :3])
    t = (uv - X @ (scale * R[:2]).T).mean(0)
    return scale, R, t


def _skew(v: np.ndarray) -> np.ndarray:
    """(N, 3) vectors -> (N, 3, 3) cross-product matrices."""
    z = np.zeros(len(v))
    return np.stack([np.stack([z, -v[:, 2], v[:, 1]], -1), np.stack([v[:, 2], z, -v[:, 0]], -1),
                     np.stack([-v[:, 1], v[:, 0], z], -1)], 1)


def _rotation_step(omega: np.ndarray) -> np.ndarray:
    """exp([omega]x) by Rodrigues' formula."""
    theta = float(np.linalg.norm(omega))
    if theta < 1e-12:
        return np.eye(3)
    k = _skew((omega / theta)[None])[0]
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def fit_landmarks(model: MorphableModel, landmarks2d: np.ndarray, config: FitConfig = FitConfig(),
                  prior: CoefficientPrior | None = None, init: FitResult | None = None) -> FitResult:
    """Fit identity, expression and pose of `model` to (68, 2) pixel landmarks.

    Without ``init``, starts with a few alternations (closed-form pose, then a linear ridge solve of
    coefficients); with it (e.g. a regressor's coefficients and pose), starts from there. Then
    refines pose and coefficients jointly by Gauss-Newton: alternation alone creeps along the
    directions where pose and identity trade off (overall size vs scale, asymmetry vs yaw)."""
    target = np.asarray(landmarks2d, np.float64)[:, :2]
    if target.shape != (NUM_LANDMARKS, 2) or not np.all(np.isfinite(target)):
        raise ValueError(f"need {NUM_LANDMARKS} finite 2-D landmarks, got shape {target.shape}")
    iod = interocular_distance(target)
    if iod < MIN_INTEROCULAR_PX:
        raise ValueError(f"landmarks are degenerate: inter-ocular distance {iod:.2f} px")
    prior = prior or CoefficientPrior.isotropic(model)
    # Work in a y-up frame (the model's camera frame); the pixel pose flips back at the end.
    uv = np.stack([target[:, 0], -target[:, 1]], axis=1)
    mean = model.lm_mean.astype(np.float64).reshape(-1, 3)
    basis = np.concatenate([model.lm_id_basis, model.lm_exp_basis], axis=1).astype(np.float64)
    n_id, n_coef = model.n_id, basis.shape[1]
    basis3 = basis.reshape(NUM_LANDMARKS, 3, n_coef)
    sigma = config.noise * iod
    precision = np.full(n_coef, config.reg) / prior.std ** 2
    if init is not None:
        coef = np.concatenate([init.id_coeffs, init.exp_coeffs]).astype(np.float64)
        R, scale = np.asarray(init.pose.rotation, np.float64), float(init.pose.scale)
        t = init.pose.translation3[:2] * np.array([1.0, -1.0])  # pixel frame -> y-up
    else:
        coef = prior.mean.copy() if config.reg > 0 else np.zeros(n_coef)
        for _ in range(config.alternations):
            X = mean + basis3 @ coef
            scale, R, t = _pose_for(X, uv)
            # Given the pose the projection is linear in the coefficients: uv - t - sR2 mean = M coef.
            M = np.einsum("ij,ljk->lik", scale * R[:2], basis3).reshape(-1, n_coef)
            rhs = (uv - t - mean @ (scale * R[:2]).T).reshape(-1)
            lhs = M.T @ M / sigma ** 2 + np.diag(precision)
            coef = np.linalg.solve(lhs, M.T @ rhs / sigma ** 2 + precision * prior.mean)
        X = mean + basis3 @ coef
        scale, R, t = _pose_for(X, uv)

    # Gauss-Newton on (coef, rotation increment, log scale, t); prior rows keep it well posed.
    # Coefficient steps are taken in units of the prior std so the normal equations are well
    # scaled (raw 3DDFA identity coefficients are ~1e5, a pixel translation ~1).
    unit = prior.std
    sqrt_prec = np.sqrt(precision) * unit
    for _ in range(config.iterations):
        X = mean + basis3 @ coef
        sR2 = scale * R[:2]
        r_data = ((X @ sR2.T + t - uv) / sigma).reshape(-1)
        J_coef = np.einsum("ij,ljk->lik", sR2, basis3).reshape(-1, n_coef) * unit
        J_rot = np.einsum("ij,ljk->lik", -sR2, _skew(X)).reshape(-1, 3)
        J_scale = (X @ sR2.T).reshape(-1, 1)
        J_t = np.tile(np.eye(2), (NUM_LANDMARKS, 1))
        J = np.hstack([J_coef, J_rot, J_scale, J_t]) / sigma
        r_prior = sqrt_prec * (coef - prior.mean) / unit
        A = J.T @ J
        A[:n_coef, :n_coef] += np.diag(sqrt_prec ** 2)
        g = J.T @ r_data
        g[:n_coef] += sqrt_prec * r_prior
        step = np.linalg.solve(A + 1e-9 * np.trace(A) / len(A) * np.eye(len(A)), -g)
        coef = coef + step[:n_coef] * unit
        R = R @ _rotation_step(step[n_coef:n_coef + 3])
        scale *= float(np.exp(step[n_coef + 3]))
        t = t + step[n_coef + 4:]
        if np.abs(step[:n_coef + 4]).max() < 1e-6:
            break

    X = mean + basis3 @ coef
    pose = Pose(R, scale, np.array([t[0], -t[1], 0.0]))
    return FitResult(coef[:n_id].astype(np.float32), coef[n_id:].astype(np.float32), pose,
                     model.project(X, pose))


class LandmarkFitExtractor(FaceExtractor):
    """3DMM coefficients by fitting 68 landmarks (see the module docstring): the detector's box,
    then a landmark predictor on it (dlib's by default), then the fit."""

    name = "fit"

    def __init__(self, detector=DEFAULT_DETECTOR, device: str = "cpu", *, landmark_source="dlib",
                 model: MorphableModel | None = None, prior: CoefficientPrior | None = None,
                 reg: float = FitConfig.reg, iterations: int = FitConfig.iterations,
                 with_vertices: bool = False, detect_threads: int = 1):
        super().__init__(make_face_detector(detector, device, threads=detect_threads))
        self.predictor = make_landmark_source(landmark_source, device)
        self.model = model or MorphableModel.from_tddfa()
        # 3DDFA's basis comes with coefficient statistics; another basis gets an isotropic prior.
        self.prior = prior or (CoefficientPrior.tddfa() if self.model.name == "tddfa_bfm"
                               else CoefficientPrior.isotropic(self.model))
        self.prior_std = {"id": self.prior.std[:self.model.n_id], "exp": self.prior.std[self.model.n_id:]}
        self.config = FitConfig(iterations=iterations, reg=reg)
        self.with_vertices = with_vertices
        self.layout = CoefficientLayout(
            backend=self.name, n_id=self.model.n_id, n_exp=self.model.n_exp, n_feature=2 * NUM_LANDMARKS,
            model_name=f"landmark_fit_{self.model.name}", model_version=f"reg{reg:g}_it{iterations}",
            detector=self.detector.version, landmark_source=self.predictor.version)

    def fit_faces(self, faces: list[DetectedFace]) -> list[ExtractionResult]:
        with self.timings.stage("landmarks"):
            points = self.predictor.predict_batch([f.image for f in faces], [f.face.box for f in faces])
        with self.timings.stage("fit"):
            return [self._fit_one(p) for p in points]

    def _fit_one(self, detected: np.ndarray, init: FitResult | None = None,
                 feature: np.ndarray | None = None) -> ExtractionResult:
        """The fit of one face's detected points; feature defaults to the normalised residual."""
        try:
            fit = fit_landmarks(self.model, detected, self.config, self.prior, init)
        except Exception as exc:  # singular systems, malformed landmarks: this row only
            return ExtractionResult.error(f"landmark fit failed: {type(exc).__name__}: {exc}")
        if not (np.all(np.isfinite(fit.points)) and np.all(np.isfinite(fit.id_coeffs)) and np.all(np.isfinite(fit.exp_coeffs))):
            return ExtractionResult.error("landmark fit diverged (non-finite result)")
        detected = np.asarray(detected, np.float32)
        fitted = fit.points[:, :2]
        yaw, pitch, roll = fit.pose.angles
        residual = (fitted - detected) / max(interocular_distance(detected), 1e-6)
        extras = {"basis": self.model.name, "pose": fit.pose, "camera": fit.pose.affine(),
                  "landmarks3d": fit.points}
        if self.with_vertices:
            extras["vertices"] = self.model.project(self.model.vertices(fit.id_coeffs, fit.exp_coeffs), fit.pose)
        return ExtractionResult(
            landmarks=detected, landmarks_fit=fitted.astype(np.float32),
            id_coeffs=fit.id_coeffs, exp_coeffs=fit.exp_coeffs,
            yaw=yaw, pitch=pitch, roll=roll, scale=float(fit.pose.scale),
            translation=fit.pose.translation3.astype(np.float32),
            feature=residual.astype(np.float32).ravel() if feature is None else feature, extras=extras)


class TDDFAFitExtractor(LandmarkFitExtractor):
    """3DDFA_V2's regression, then the landmark fit started from its pose and coefficients.

    The regressor gives a pose that holds on turned faces and its pooled feature (C-Net's input);
    the fit to a landmark predictor's 68 points (dlib's by default) gives identity coefficients that
    follow the person's own geometry, where the regressor's stay close to its training faces."""

    name = "tddfa-fit"

    def __init__(self, detector=DEFAULT_DETECTOR, device: str = "cpu", *, landmark_source="dlib",
                 checkpoint: str = "tddfa/mb05_120x120.pth", batch_size: int | None = None,
                 reg: float = FitConfig.reg, iterations: int = FitConfig.iterations,
                 num_threads: int | None = None, with_vertices: bool = False, detect_threads: int = 1):
        from facedist.extractors.tddfa import TDDFARegressor

        regressor = TDDFARegressor(device, checkpoint=checkpoint, batch_size=batch_size, num_threads=num_threads)
        super().__init__(detector, device, landmark_source=landmark_source, model=regressor.model, reg=reg,
                         iterations=iterations, with_vertices=with_vertices, detect_threads=detect_threads)
        regressor.timings = self.timings
        self.regressor = regressor
        self.layout = replace(self.layout, n_feature=regressor.net.num_features,
                              model_name=f"3ddfa_v2_{regressor.path.stem}+landmark_fit_{self.model.name}",
                              model_version=f"{assets.sha256_of(regressor.path)[:12]}_reg{reg:g}_it{iterations}")

    def fit_faces(self, faces: list[DetectedFace]) -> list[ExtractionResult]:
        from facedist.extractors.tddfa import pose_from_affine

        images, boxes = [f.image for f in faces], [f.face.box for f in faces]
        regressed = self.regressor.fit(images, boxes)
        with self.timings.stage("landmarks"):
            points = self.predictor.predict_batch(images, boxes)
        with self.timings.stage("fit"):
            out = []
            for fit, detected in zip(regressed, points):
                if not np.all(np.isfinite(fit.params)):
                    out.append(ExtractionResult.error("regressor produced non-finite parameters"))
                    continue
                _, id_coeffs, exp_coeffs = self.regressor.camera_and_coeffs(fit.params)
                init = FitResult(id_coeffs, exp_coeffs, pose_from_affine(fit.camera), fit.points)
                out.append(self._fit_one(detected, init=init, feature=fit.feature))
            return out
