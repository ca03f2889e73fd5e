"""facedist.face_chip against dlib's own chips: same 68 points, dlib.get_face_chip(size 150, padding 0.25)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SHARED
from facedist.face_chip import face_chip, face_chip_details, face_chips, pyramid_down, similarity_transforms
from facedist.images import decode_image

DATA = Path(__file__).parent / "data" / "face_descriptor"
REFERENCE = json.loads((DATA / "reference.json").read_text())
LONDON = SHARED / "data" / "london"


def london_face(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = LONDON / name
    if not path.is_file():
        pytest.fail(f"London photos not found at {LONDON}; put ../shared beside the checkout")
    return decode_image(path.read_bytes()), np.array(REFERENCE["faces"][name]["landmarks"], np.float64)


def dlib_chip(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    import dlib

    shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1),
                                       [dlib.point(int(x), int(y)) for x, y in points])
    return dlib.get_face_chip(image, shape, size=150, padding=0.25)


def test_chip_is_dlibs_committed_chip():
    """The chip of a London photo equals the chip dlib cut from it when the reference was written."""
    image, points = london_face("001_03.jpg")
    expected = cv2.cvtColor(cv2.imread(str(DATA / "001_03_chip.png")), cv2.COLOR_BGR2RGB)
    chip = face_chip(image, points)
    assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
    assert np.abs(chip.astype(int) - expected.astype(int)).max() <= 1


# Scales put the chip's rectangle on 002_03 at 126 px (smaller than the chip), 220 px (bilinear
# only), 314 px (one pyramid level) and 785 px (two);
# the last two shifts push part of the chip past the image's border (black there, as in dlib).
@pytest.mark.parametrize("scale, shift, past_border", [
    (0.4, (0, 0), False), (1.0, (0, 0), False), (2.5, (0, 0), False), (0.7, (13, -7), False),
    (1.0, (-250, 0), True), (1.0, (0, 230), True)])
def test_chip_matches_dlib_get_face_chip(scale, shift, past_border):
    """Measured: identical, pixel for pixel, at every case here; 1 grey level is allowed for the
    truncation of a bilinear value that lands on an integer."""
    image, points = london_face("002_03.jpg")
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    image = cv2.warpAffine(image, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), image.shape[1::-1])
    points = np.round(points * scale + np.array(shift))
    ours, theirs = face_chip(image, points), dlib_chip(image, points)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert ((theirs.sum(-1) == 0).mean() > 0.1) == past_border  # the case is the one it claims


def test_details_match_dlib_and_batch_over_faces():
    import dlib

    faces = [london_face(name) for name in REFERENCE["faces"]]
    details = face_chip_details(np.stack([p for _, p in faces]))
    for i, (_, points) in enumerate(faces):
        shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), [dlib.point(int(x), int(y)) for x, y in points])
        theirs = dlib.get_face_chip_details(shape, 150, 0.25)
        r = theirs.rect
        np.testing.assert_allclose(details.rect[i], [r.left(), r.top(), r.right(), r.bottom()], atol=1e-6)
        assert details.angle[i] == pytest.approx(theirs.angle, abs=1e-9)
    batch = face_chips([im for im, _ in faces], np.stack([p for _, p in faces]))
    for (image, points), chip in zip(faces, batch):
        np.testing.assert_array_equal(chip, face_chip(image, points))


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 150, (3, 33, 2))
    angle, scale, shift = np.array([0.3, -1.2, 2.0]), np.array([0.5, 2.0, 3.1]), rng.normal(0, 50, (3, 2))
    rot = np.stack([np.stack([np.cos(angle), -np.sin(angle)], 1), np.stack([np.sin(angle), np.cos(angle)], 1)], 1)
    dst = np.einsum("nij,nkj->nki", scale[:, None, None] * rot, src) + shift[:, None]
    tform = similarity_transforms(src, dst)
    np.testing.assert_allclose(tform[:, :, :2], scale[:, None, None] * rot, atol=1e-9)
    np.testing.assert_allclose(tform[:, :, 2], shift, atol=1e-7)


def test_pyramid_down_keeps_a_flat_image_flat_and_halves_its_size():
    flat = np.full((41, 30, 3), 200, np.uint8)
    down = pyramid_down(flat)
    assert down.shape == (19, 13, 3)  # (h - 3) // 2, (w - 3) // 2: dlib's sizes
    assert (down == 200).all()


def test_a_face_almost_wholly_outside_the_image_gives_a_black_chip_not_an_error():
    image, points = london_face("001_03.jpg")
    far = points + np.array([image.shape[1] - points[:, 0].min() - 3, 0])  # only a sliver overlaps
    chip = face_chip(image, far)
    assert chip.shape == (150, 150, 3) and (chip.reshape(-1, 3).sum(1) == 0).mean() > 0.75
    np.testing.assert_array_equal(chip, dlib_chip(image, far))
    with pytest.raises(ValueError, match="RGB uint8"):
        face_chip(image[..., 0], points)
