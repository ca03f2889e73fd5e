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
    faces = rng.normal(0, 20, (6, 68, 2)) + 100
    angle, scale, shift = 0.3, 1.7, np.array([40.0, -25.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = faces.copy()
    moved[3] = faces[3] @ rotation.T + shift   # the same face, turned, scaled and shifted
    out = trials.aligned_landmarks(np.concatenate([faces, moved[3:4]]))
    assert np.allclose(out[3], out[6], atol=1e-3)
    assert not np.allclose(out[3], out[4], atol=1.0)


def test_hog_puts_a_vertical_edge_in_the_horizontal_gradient_bin(trials):
    image = np.zeros((32, 32), np.uint8)
    image[:, 16:] = 200
    blocks = trials.hog(image).reshape(-1, 4, 9)
    assert blocks.shape[0] == 9                      # 4x4 cells of 8 px -> 3x3 blocks of 2x2 cells
    assert blocks.sum(axis=(0, 1)).argmax() == 0     # gradient along x: orientation 0
    assert np.all(np.linalg.norm(blocks.reshape(9, -1), axis=1) <= 1 + 1e-6)


def test_probe_hits_scores_every_row_once_per_seed(trials):
    rng = np.random.default_rng(1)
    subjects = np.repeat([f"p{i}" for i in range(20)], 2)
    codes = np.tile([0, 1], 20)
    x = rng.normal(0, 1, (40, 5))
    x[:, 0] += 4 * codes                             # one informative dimension
    hits = trials.probe_hits(x, codes, subjects, seeds=2, n_classes=2)
    assert hits.shape == (2, 40) and set(np.unique(hits)) <= {0.0, 1.0}
    assert hits.mean() > 0.9
    shuffled = trials.probe_hits(rng.normal(0, 1, (40, 5)), codes, subjects, seeds=2, n_classes=2)
    assert shuffled.mean() < hits.mean()
