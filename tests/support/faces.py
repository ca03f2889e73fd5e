"""The Yale photos the detector and landmark tests share, as arrays."""

from __future__ import annotations

import cv2
import numpy as np

from facedist.images import decode_image


def yale_image(yale_dir, name: str) -> np.ndarray:
    """One Yale photo as RGB uint8."""
    return decode_image((yale_dir / name).read_bytes())


def two_faces(yale_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two Yale people side by side, the second at 0.6 scale; returns the image and where each
    pasted photo lies (x0, y0, x1, y1)."""
    big = yale_image(yale_dir, "subject01.normal")
    small = cv2.resize(yale_image(yale_dir, "subject02.happy"), None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    height, width = big.shape[:2]
    canvas = np.full((height, width + 20 + small.shape[1], 3), 128, np.uint8)
    canvas[:, :width] = big
    y = (height - small.shape[0]) // 2
    canvas[y:y + small.shape[0], width + 20:] = small
    big_region = np.array([0, 0, width, height], np.float32)
    small_region = np.array([width + 20, y, canvas.shape[1], y + small.shape[0]], np.float32)
    return canvas, big_region, small_region


# Extractor settings for tests of the pipeline around the extractor (Ray, storage, resume, faults,
# serving), not of the face features: 3DDFA_V2's geometry without the texture, dlib descriptor and
# face-api nets, about a third of the CPU an image and a tenth of the start-up.
GEOMETRY_ONLY = dict(texture=False, face_embedding=False, face_attributes=False)
GEOMETRY_ONLY_FLAGS = [f"--no-{name.replace('_', '-')}" for name in GEOMETRY_ONLY]  # the CLI's flags for them
