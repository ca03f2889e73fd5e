"""Landmark-fit extractor: recovers known coefficients from synthetic landmarks; works on real faces."""

from __future__ import annotations

import numpy as np
import pytest

from facedist.extractors import make_extractor
from facedist.extractors.base import interocular_distance
from facedist.extractors.fit import CoefficientPrior, FitConfig, fit_landmarks
from facedist.images import decode_image
from facedist.morphable import MorphableModel, Pose
from facedist.schema import STATUS_ERROR, STATUS_NO_FACE, STATUS_OK


@pytest.fixture(scope="module")
def bfm() -> MorphableModel:
    return MorphableModel.from_tddfa()


@pytest.fixture(scope="module")
def prior() -> CoefficientPrior:
    return CoefficientPrior.tddfa()


def _synthetic(bfm, prior, seed, angles=(25.0, -10.0, 5.0)):
    rng = np.random.default_rng(seed)
    coef = prior.mean + 0.8 * prior.std * rng.standard_normal(50)
    pose = Pose.from_angles(*angles, scale=0.0015, translation=(160, 120, 0))
    points = bfm.project(bfm.landmarks(coef[:40], coef[40:]), pose)[:, :2]
    return coef, pose, points


@pytest.mark.parametrize("seed,angles", [(0, (25.0, -10.0, 5.0)), (1, (-35.0, 15.0, -8.0)), (2, (5.0, 2.0, 20.0))])
def test_fit_recovers_known_coefficients_and_pose(bfm, prior, seed, angles):
    coef, pose, points = _synthetic(bfm, prior, seed, angles)
    fit = fit_landmarks(bfm, points, FitConfig(reg=1e-6), prior)  # exact data: (almost) no prior
    got = np.concatenate([fit.id_coeffs, fit.exp_coeffs])
    # every coefficient within 2% of its prior std; the pose to a hundredth of a degree
    assert np.abs((got - coef) / prior.std).max() < 0.02
    np.testing.assert_allclose(fit.pose.angles, angles, atol=0.05)
    assert fit.pose.scale == pytest.approx(0.0015, rel=1e-3)
    np.testing.assert_allclose(fit.pose.translation3[:2], (160, 120), atol=0.2)
    assert np.linalg.norm(fit.points[:, :2] - points, axis=1).max() < 0.01


def test_regularised_fit_is_robust_to_landmark_noise(bfm, prior):
    coef, pose, points = _synthetic(bfm, prior, 7)
    truth3d = bfm.landmarks(coef[:40], coef[40:])
    iod = interocular_distance(points)
    noisy = points + np.random.default_rng(7).normal(0, 0.02 * iod, points.shape)
    plain = fit_landmarks(bfm, noisy, FitConfig(reg=1e-6), prior)
    regular = fit_landmarks(bfm, noisy, FitConfig(reg=1.0), prior)

    def shape_error(fit):  # 3-D landmark geometry error (pose-free), per inter-ocular distance
        lm = bfm.landmarks(fit.id_coeffs, fit.exp_coeffs)
        return np.linalg.norm((lm - lm.mean(0)) - (truth3d - truth3d.mean(0)), axis=1).mean() / interocular_distance(truth3d)

    # the prior keeps the 3-D shape closer to the truth than an unregularised fit to noise
    assert shape_error(regular) < shape_error(plain)
    assert shape_error(regular) < 0.05
    assert np.abs(np.array(regular.pose.angles) - (25, -10, 5)).max() < 3


def test_fit_rejects_malformed_landmarks(bfm, prior):
    with pytest.raises(ValueError):
        fit_landmarks(bfm, np.zeros((5, 2)), FitConfig(), prior)
    with pytest.raises(ValueError):
        fit_landmarks(bfm, np.full((68, 2), np.nan), FitConfig(), prior)


@pytest.mark.slow  # a full extractor over Yale photos
def test_fit_extractor_on_yale(yale_dir):
    """Real faces (every 4th Yale image): >= 95% ok, small landmark error, rows in = rows out."""
    extractor = make_extractor("fit", detector="dlib")
    paths = sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject"))[::4]
    images = [decode_image(p.read_bytes()) for p in paths] + [np.full((120, 160, 3), 90, np.uint8), "not an image"]
    results = extractor.extract(images)
    assert len(results) == len(images)
    assert results[-2].status == STATUS_NO_FACE and results[-1].status == STATUS_ERROR
    real = results[:-2]
    ok = [r for r in real if r.status == STATUS_OK]
    errors = np.array([r.landmark_error for r in ok])
    print(f"\nfit on Yale[::4]: {len(ok)}/{len(real)} ok, mean landmark error {errors.mean():.4f}")
    assert len(ok) / len(real) >= 0.95 and errors.mean() < 0.05
    r = ok[0]
    assert r.id_coeffs.shape == (40,) and r.exp_coeffs.shape == (10,) and r.feature.shape == (136,)
    assert extractor.layout.n_feature == 136 and extractor.layout.backend == "fit"
    assert extractor.layout.detector.startswith("hog:dlib-")
    assert "shape_predictor_68_face_landmarks" in extractor.layout.landmark_source
    # the residual feature is the normalised fit-minus-detected landmark offsets
    np.testing.assert_allclose(np.linalg.norm(r.feature.reshape(68, 2), axis=1).mean(), r.landmark_error, rtol=1e-4)


def test_degenerate_landmarks_give_a_row_error_not_an_exception(yale_dir):
    class Collapsed:  # a LandmarkPredictor putting every landmark on one pixel: no inter-ocular distance, no pose
        name = "collapsed"
        version = "collapsed-1"

        def __init__(self):
            self.boxes = []

        def predict_batch(self, images, boxes):
            self.boxes.extend(np.asarray(b, np.float32) for b in boxes)
            return [np.full((68, 2), 50, np.float32) for _ in images]

    image = decode_image((yale_dir / "subject03.normal").read_bytes())
    collapsed = Collapsed()
    extractor = make_extractor("fit", detector="dlib", landmark_source=collapsed)
    assert extractor.predictor is collapsed and extractor.layout.landmark_source == "collapsed-1"
    result = extractor.extract([image])[0]
    assert result.status == STATUS_ERROR and "degenerate" in result.message
    assert (result.width, result.height, result.num_faces) == (320, 243, 1)
    # the predictor got the detector's box, and the row keeps it
    assert len(collapsed.boxes) >= 1
    np.testing.assert_array_equal(collapsed.boxes[0], result.box)


def test_fit_from_an_initial_guess_reaches_the_same_fit(bfm, prior):
    """tddfa-fit starts the fit from the regressor's pose and coefficients: from a nearby start it
    lands where the fit from scratch lands (one regularised optimum)."""
    from facedist.extractors.fit import FitResult

    coef, pose, points = _synthetic(bfm, prior, 3)
    noisy = points + np.random.default_rng(3).normal(0, 0.01 * interocular_distance(points), points.shape)
    scratch = fit_landmarks(bfm, noisy, FitConfig(reg=1.0), prior)
    rng = np.random.default_rng(4)
    start = coef + 0.3 * prior.std * rng.standard_normal(50)
    guess = Pose.from_angles(*(np.array(pose.angles) + (4.0, -3.0, 2.0)), scale=0.0016, translation=(163, 117, 0))
    init = FitResult(start[:40].astype(np.float32), start[40:].astype(np.float32), guess, None)
    started = fit_landmarks(bfm, noisy, FitConfig(reg=1.0, iterations=30), prior, init=init)
    got = np.concatenate([started.id_coeffs, started.exp_coeffs])
    want = np.concatenate([scratch.id_coeffs, scratch.exp_coeffs])
    assert np.abs((got - want) / prior.std).max() < 0.01
    np.testing.assert_allclose(started.pose.angles, scratch.pose.angles, atol=0.1)


def test_tddfa_fit_extractor_on_yale(yale_dir):
    """The default backend: tddfa's regression then the fit to dlib's points; its identity
    coefficients are the landmark fit's, its feature the regressor's, and it samples texture."""
    paths = sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject"))[::8]
    images = [decode_image(p.read_bytes()) for p in paths]
    hybrid = make_extractor("tddfa-fit")
    results = hybrid.extract(images + ["not an image"])
    assert len(results) == len(images) + 1 and results[-1].status == STATUS_ERROR
    ok = [r for r in results[:-1] if r.ok]
    assert len(ok) / len(images) >= 0.95
    layout = hybrid.layout
    assert layout.backend == "tddfa-fit" and layout.n_feature == 512 and layout.n_texture_vertices > 1000
    assert all(r.feature.shape == (512,) and r.texture.shape == (layout.n_texture_vertices, 4) for r in ok)
    assert np.mean([r.landmark_error for r in ok]) < 0.05
    # same detector, same predictor on the same box: the fit backend's optimum
    plain = make_extractor("fit", detector=hybrid.detector, landmark_source=hybrid.predictor, texture=False)
    for a, b in zip(results[:-1], plain.extract(images)):
        if a.ok and b.ok:
            prior = CoefficientPrior.tddfa()
            assert np.abs((a.id_coeffs - b.id_coeffs) / prior.std[:40]).max() < 0.05
