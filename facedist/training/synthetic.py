"""Synthetic image sets from the morphable model, with a known identity and view-dependent noise.

Each person has a true identity α*; each of their images has its own expression and pose and
an identity estimate α_i = α* + noise whose size grows with |yaw| and with a per-image
"blur" (a hidden quality), differently per dimension, the way a regressor's errors do. The
extractor-side columns are simulated consistently: detected landmarks come from the *true* face
(plus pixel noise), ``landmarks_fit`` from the noisy estimate under the same camera, and the
C-Net quality inputs (pose, detection score, landmark residual, a pooled "feature") carry the
noise only indirectly. Used to show C-Net aggregation beats the plain mean (error to truth), and
to make labelled tables for tests (gender is a function of the identity here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facedist.schema import STATUS_OK, CoefficientLayout, rows_to_table
from facedist.training.geometry import KeypointBasis, camera_from_pose, homogeneous, interocular


@dataclass(frozen=True)
class SyntheticConfig:
    n_people: int = 64
    images_per_person: int = 10
    n_feature: int = 8            # length of the simulated pooled feature
    max_yaw: float = 70.0
    noise: float = 0.8            # identity noise, in units of the prior std, at the worst view
    landmark_noise_px: float = 0.6
    face_width_px: float = 100.0
    seed: int = 0


def _tddfa_prior(n_id: int, n_exp: int) -> tuple[np.ndarray, np.ndarray]:
    """Prior std of the identity / expression coefficients (3DDFA's parameter std)."""
    import pickle

    from facedist import assets

    with open(assets.resolve("tddfa/param_mean_std_62d_120x120.pkl"), "rb") as fh:
        stats = pickle.load(fh)
    std = np.asarray(stats["std"], np.float64)
    return std[12:12 + n_id], std[52:52 + n_exp]


def make_synthetic(config: SyntheticConfig = SyntheticConfig(), basis: KeypointBasis | None = None) -> dict:
    """Arrays for every image: subject (int), true_id_coeffs, id_coeffs (noisy), exp_coeffs, yaw/pitch/roll,
    det_score, landmarks (detected, 68x2), landmarks_fit, landmark_error, feature, gender."""
    basis = basis or KeypointBasis.tddfa()
    rng = np.random.default_rng(config.seed)
    std_id, std_exp = _tddfa_prior(basis.n_id, basis.n_exp)
    n = config.n_people * config.images_per_person
    subject = np.repeat(np.arange(config.n_people), config.images_per_person)
    id_person = rng.standard_normal((config.n_people, basis.n_id)) * std_id
    true_id_coeffs = id_person[subject]
    exp_coeffs = rng.standard_normal((n, basis.n_exp)) * std_exp * 0.7
    yaw = rng.uniform(-config.max_yaw, config.max_yaw, n)
    pitch = rng.normal(0, 8, n)
    roll = rng.normal(0, 5, n)
    blur = rng.beta(1.2, 3.0, n)                      # hidden per-image quality problem, 0..1

    # View-dependent noise, per dimension: a profile view hides width-like dims (odd ones here),
    # a blurred image hurts fine-detail (high-index) dims most.
    side = np.abs(np.sin(np.deg2rad(yaw)))[:, None]
    dims = np.arange(basis.n_id)[None, :]
    view_gain = np.where(dims % 2 == 1, 1.0, 0.35) * side
    blur_gain = (0.3 + 0.7 * dims / max(basis.n_id - 1, 1)) * blur[:, None]
    sigma = config.noise * (0.08 + view_gain + 1.2 * blur_gain)
    id_coeffs = true_id_coeffs + rng.standard_normal((n, basis.n_id)) * sigma * std_id

    mean_width = np.ptp(basis.mean[:, 0])
    scale = config.face_width_px / mean_width * rng.uniform(0.8, 1.2, n)
    cams = np.stack([camera_from_pose(yaw[i], pitch[i], roll[i], scale[i], 160 + rng.normal(0, 10),
                                      120 + rng.normal(0, 10)) for i in range(n)])
    true_pts = np.einsum("nki,nij->nkj", homogeneous(basis.points(true_id_coeffs, exp_coeffs).astype(np.float64)), cams)
    fit_pts = np.einsum("nki,nij->nkj", homogeneous(basis.points(id_coeffs, exp_coeffs).astype(np.float64)), cams)
    px_noise = config.landmark_noise_px * (1 + 2 * blur)[:, None, None]
    detected = true_pts + rng.standard_normal(true_pts.shape) * px_noise
    iod = interocular(detected)
    landmark_error = np.linalg.norm(fit_pts - detected, axis=-1).mean(-1) / np.maximum(iod, 1e-6)
    det_score = np.clip(1.0 - 0.5 * blur - 0.2 * side[:, 0] + rng.normal(0, 0.05, n), 0.05, 1.0)
    # A "pooled feature": a random linear read-out of (blur, |yaw|) plus clutter, as a CNN's would be.
    mix = rng.standard_normal((3, config.n_feature))
    feature = np.stack([blur, side[:, 0], rng.standard_normal(n)], 1) @ mix
    feature += 0.3 * rng.standard_normal(feature.shape)
    # Gender as a fixed function of identity (for labelled test tables only).
    gender_axis = rng.standard_normal(basis.n_id)
    gender = np.where((id_person / std_id) @ gender_axis > 0, "male", "female")[subject]
    return {
        "subject": subject, "true_id_coeffs": true_id_coeffs.astype(np.float32), "id_coeffs": id_coeffs.astype(np.float32),
        "exp_coeffs": exp_coeffs.astype(np.float32), "yaw": yaw.astype(np.float32), "pitch": pitch.astype(np.float32),
        "roll": roll.astype(np.float32), "scale": scale.astype(np.float32),
        "det_score": det_score.astype(np.float32), "landmarks": detected.astype(np.float32),
        "landmarks_fit": fit_pts.astype(np.float32), "landmark_error": landmark_error.astype(np.float32),
        "feature": feature.astype(np.float32), "gender": gender, "blur": blur.astype(np.float32),
        "sigma": sigma.astype(np.float32),
    }


def synthetic_table(config: SyntheticConfig = SyntheticConfig(), *, expressions: tuple[str, ...] = (),
                    basis: KeypointBasis | None = None):
    """The synthetic set as a coefficients table (facedist.schema), for end-to-end tests.

    With ``expressions``, each image's expression label is drawn from them and its exp_coeffs moved
    along a label-specific direction, so an expression classifier has something to learn."""
    basis = basis or KeypointBasis.tddfa()
    data = make_synthetic(config, basis)
    rng = np.random.default_rng(config.seed + 1)
    n = len(data["subject"])
    labels = [None] * n
    if expressions:
        _, std_exp = _tddfa_prior(basis.n_id, basis.n_exp)
        codes = rng.integers(0, len(expressions), n)
        directions = rng.standard_normal((len(expressions), basis.n_exp)) * std_exp
        data["exp_coeffs"] = (data["exp_coeffs"] * 0.5 + directions[codes]).astype(np.float32)
        labels = [expressions[c] for c in codes]
    layout = CoefficientLayout(backend="synthetic", n_id=basis.n_id, n_exp=basis.n_exp,
                               n_feature=config.n_feature, model_name="tddfa_bfm")
    rows = []
    for i in range(n):
        rows.append({
            "path": f"synthetic/subject{data['subject'][i]:03d}/{i:05d}.png", "status": STATUS_OK,
            "message": "", "subject": f"subject{data['subject'][i]:03d}", "expression": labels[i],
            "gender": str(data["gender"][i]), "width": 320, "height": 240, "num_faces": 1,
            "det_score": float(data["det_score"][i]), "landmarks": data["landmarks"][i].ravel().tolist(),
            "landmarks_fit": data["landmarks_fit"][i].ravel().tolist(),
            "landmark_error": float(data["landmark_error"][i]), "id_coeffs": data["id_coeffs"][i].tolist(),
            "exp_coeffs": data["exp_coeffs"][i].tolist(), "yaw": float(data["yaw"][i]),
            "pitch": float(data["pitch"][i]), "roll": float(data["roll"][i]),
            "scale": float(data["scale"][i]), "feature": data["feature"][i].tolist(), "backend": "synthetic",
        })
    return rows_to_table(rows, layout), data
