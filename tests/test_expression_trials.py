"""The pieces of scripts/expression_trials.py that are not the report's own (those are tested in
test_person_report): landmark alignment, HOG, and the probe over person folds."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "expression_trials.py"


@pytest.fixture(scope="module")
def trials():
    spec = importlib.util.spec_from_file_location("expression_trials", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aligned_landmarks_undo_a_similarity(trials):
    rng = np.random.default_rng(0)
    faces = rng.normal(0, 20, (3, 68, 2)) + 100
    angle, scale, shift = 0.3, 1.7, np.array([40.0, -25.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = faces[1] @ rotation.T + shift            # the same face, turned, scaled and shifted
    out = trials.aligned_landmarks(np.concatenate([faces, moved[None]]), reference=faces[0])
    assert np.allclose(out[0], faces[0], atol=1e-6)   # the reference maps onto itself
    assert np.allclose(out[1], out[3], atol=1e-6)
    assert not np.allclose(out[1], out[2], atol=1.0)


def test_zoomed_crops_centre_the_point_and_give_bgr(trials):
    image = np.zeros((200, 300, 3), np.uint8)
    image[90:110, 190:210] = (255, 0, 0)              # a red square centred at x=200, y=100 (RGB)
    crop = trials.zoomed_crops([image], np.array([[200.0, 100.0]]), np.array([20.0]), size=40)[0]
    assert crop.shape == (40, 40, 3)
    assert crop[20, 20, 2] == 255 and crop[20, 20, 0] == 0   # red lands in the last channel: BGR
    assert crop[2, 2].max() == 0                           # the corner is outside the square


def test_hog_puts_a_vertical_edge_in_the_horizontal_gradient_bin(trials):
    image = np.zeros((32, 32), np.uint8)
    image[:, 16:] = 200
    blocks = trials.hog(image).reshape(-1, 4, 9)
    assert blocks.shape[0] == 9                      # 4x4 cells of 8 px -> 3x3 blocks of 2x2 cells
    assert blocks.sum(axis=(0, 1)).argmax() == 0     # gradient along x: orientation 0
    assert np.all(np.linalg.norm(blocks.reshape(9, -1), axis=1) <= 1 + 1e-6)


@pytest.mark.slow  # probes over seeds
def test_probe_hits_scores_every_row_once_per_seed(trials):
    rng = np.random.default_rng(1)
    subjects = np.repeat([f"p{i}" for i in range(20)], 2)
    codes = np.tile([0, 1], 20)
    x = rng.normal(0, 1, (40, 5))
    x[:, 0] += 4 * codes                             # one informative dimension
    hits = trials.probe_hits(x, codes, subjects, seeds=2, n_classes=2)
    assert hits.shape == (2, 40) and set(np.unique(hits)) <= {0.0, 1.0}   # no row left unscored (nan)
    assert hits.mean() > 0.9
    noise = trials.probe_hits(rng.normal(0, 1, (40, 5)), codes, subjects, seeds=2, n_classes=2)
    assert noise.mean() < hits.mean()
    # with the mirrored copies: training rows twice, test rows the mean of the pair
    mirrored = trials.probe_hits(x, codes, subjects, seeds=2, n_classes=2, mirror=x + rng.normal(0, 0.1, x.shape))
    assert set(np.unique(mirrored)) <= {0.0, 1.0} and mirrored.mean() > 0.9
