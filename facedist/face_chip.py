"""Aligned face chips as dlib cuts them for its face descriptor (dlib.get_face_chip, size 150,
padding 0.25), from 68 iBUG landmarks, in numpy.

dlib's recipe (dlib/image_transforms/interpolation.h, image_pyramid.h), followed step by step so
that the chips match dlib's to within a grey level:

  * get_face_chip_details: a least-squares similarity transform (Umeyama) from 33 points of a
    fixed mean face (eyes, nose, outer mouth, upper inner lip; not the jaw, brows or lower lip),
    placed in a size x size chip with `padding` x the template's width on every side, onto the
    image's landmarks. Its scale and rotation with the chip centre's image become a rectangle
    and an angle.
  * extract_image_chips: bilinear sampling on that rectangle (chip corner pixels onto the
    rectangle's corners, rotated about its centre). A face larger than about twice the chip is
    first reduced by dlib's pyramid_down<2> (5x5 binomial filter, every other pixel, integer
    arithmetic) as many times as keeps the rectangle larger than the chip, so that bilinear
    sampling never skips pixels. The pyramid is built on the rotated rectangle's bounding box
    (grown by a margin), and its coordinates go down with dlib's own point_down.
  * pixels whose 2x2 neighbourhood leaves the image (or that box) are black; sampled values are
    truncated to uint8, as dlib's assign_pixel does.

The transforms are computed for a whole batch at once (face_chip_details); the sampling runs per
face because each face has its own pyramid depth, each a few vectorised numpy passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from facedist.schema import NUM_LANDMARKS

CHIP_SIZE = 150
CHIP_PADDING = 0.25

# dlib's mean face, points 17..67 in a unit square (get_face_chip_details).
_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689)
_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182)
# The landmarks dlib aligns on: 27..54 and 60..64 (brows, jaw and lower lip move too much).
TEMPLATE_INDICES = np.array([i for i in range(17, NUM_LANDMARKS)
                             if not (17 <= i <= 26 or 55 <= i <= 59 or 65 <= i <= 67)])
# pyramid_down<2>'s point map (image_pyramid.h: p / 2 - (1.25, 0.75)).
_PYRAMID_OFFSET = np.array([1.25, 0.75])
_BINOMIAL = (1, 4, 6, 4, 1)


def template_points(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """(33, 2) chip coordinates of the mean-face points dlib aligns on."""
    x = np.asarray(_MEAN_FACE_X)[TEMPLATE_INDICES - 17]
    y = np.asarray(_MEAN_FACE_Y)[TEMPLATE_INDICES - 17]
    return np.stack([(padding + x) / (2 * padding + 1), (padding + y) / (2 * padding + 1)], 1) * size


def similarity_transforms(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(N, 2, 3) least-squares similarity transforms (Umeyama 1991, no reflection) taking
    src (N, K, 2) onto dst (N, K, 2): dst ~ A[:, :2] @ src + A[:, 2]."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mean_src, mean_dst = src.mean(1, keepdims=True), dst.mean(1, keepdims=True)
    src_c, dst_c = src - mean_src, dst - mean_dst
    var_src = (src_c ** 2).sum((1, 2)) / src.shape[1]
    cov = np.einsum("nki,nkj->nij", dst_c, src_c) / src.shape[1]
    u, d, vt = np.linalg.svd(cov)
    s = np.ones((len(src), 2))
    s[np.linalg.det(cov) < 0, 1] = -1  # keep a rotation, never a mirror
    rot = np.einsum("nij,nj,njk->nik", u, s, vt)
    scale = (d * s).sum(1) / var_src
    linear = scale[:, None, None] * rot
    shift = mean_dst[:, 0] - np.einsum("nij,nj->ni", linear, mean_src[:, 0])
    return np.concatenate([linear, shift[:, :, None]], 2)


@dataclass(frozen=True)
class ChipDetails:
    """dlib's chip_details for a batch: the rectangle each chip is cut from, and its angle."""

    rect: np.ndarray    # (N, 4) left, top, right, bottom in image pixels (dlib drectangle)
    angle: np.ndarray   # (N,) radians
    size: int

    def corners(self) -> np.ndarray:
        """(N, 3, 2) image positions of the chip's top-left, top-right and bottom-left pixels."""
        l, t, r, b = self.rect.T
        centre = np.stack([(l + r) / 2, (t + b) / 2], 1)
        corners = np.stack([np.stack([l, t], 1), np.stack([r, t], 1), np.stack([l, b], 1)], 1)
        cos, sin = np.cos(self.angle)[:, None], np.sin(self.angle)[:, None]
        d = corners - centre[:, None]
        rotated = np.stack([cos * d[..., 0] - sin * d[..., 1], sin * d[..., 0] + cos * d[..., 1]], -1)
        return rotated + centre[:, None]

    def chip_to_image(self) -> np.ndarray:
        """(N, 2, 3) affine maps from chip pixel (x, y) to image pixel."""
        tl, tr, bl = np.moveaxis(self.corners(), 1, 0)
        n = self.size - 1
        return np.stack([(tr - tl) / n, (bl - tl) / n, tl], 2)


def face_chip_details(landmarks: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> ChipDetails:
    """dlib's get_face_chip_details for (N, 68, 2) or (68, 2) landmarks."""
    points = np.asarray(landmarks, np.float64)
    if points.ndim == 2:
        points = points[None]
    if points.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected (N, {NUM_LANDMARKS}, 2) landmarks, got {points.shape}")
    template = np.broadcast_to(template_points(size, padding), (len(points), len(TEMPLATE_INDICES), 2))
    tform = similarity_transforms(template, points[:, TEMPLATE_INDICES])
    p = tform[:, :, 0]  # the image of the unit vector (1, 0): scale and rotation
    angle = np.arctan2(p[:, 1], p[:, 0])
    scale = np.hypot(p[:, 0], p[:, 1])
    centre = tform[:, :, :2] @ np.array([size / 2, size / 2]) + tform[:, :, 2]
    half = (size * scale - 1) / 2  # dlib's centered_drect: width counts pixels, so w - 1 apart
    rect = np.stack([centre[:, 0] - half, centre[:, 1] - half, centre[:, 0] + half, centre[:, 1] + half], 1)
    return ChipDetails(rect=rect, angle=angle, size=size)


def _area(rect: np.ndarray) -> float:
    return float((rect[2] - rect[0] + 1) * (rect[3] - rect[1] + 1))


def _rect_down(rect: np.ndarray) -> np.ndarray:
    return rect / 2 - np.tile(_PYRAMID_OFFSET, 2)


def pyramid_down(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2> on an RGB uint8 image: 5x5 binomial filter (sum 256, integer
    division), output pixel (r, c) centred on input (2r + 2, 2c + 2), ((h - 3) // 2, (w - 3) // 2)."""
    h, w = image.shape[:2]
    if h <= 8 or w <= 8:  # dlib's pyramid gives nothing below 9 px
        return np.zeros((0, 0, *image.shape[2:]), np.uint8)
    out_h, out_w = (h - 3) // 2, (w - 3) // 2
    x = image.astype(np.uint16)  # dlib's accumulator: 16 x 16 x 255 = 65280 fits
    rows = sum(k * x[:, j:j + 2 * out_w:2] for j, k in enumerate(_BINOMIAL))
    both = sum(k * rows[i:i + 2 * out_h:2] for i, k in enumerate(_BINOMIAL))
    return (both >> 8).astype(np.uint8)


def _bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples of image at xy (..., 2); black where the 2x2 neighbourhood leaves it.
    Values are truncated to uint8, as dlib's assign_pixel does (a convex mix of uint8 stays in range)."""
    h, w, channels = image.shape
    if h < 2 or w < 2:
        return np.zeros((*xy.shape[:-1], channels), np.uint8)
    x, y = xy[..., 0], xy[..., 1]
    left, top = np.floor(x), np.floor(y)
    inside = ((left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)).ravel()
    # Flat indices and take(): far cheaper than 2-D fancy indexing here.
    idx = (np.clip(top, 0, h - 2).astype(np.intp) * w + np.clip(left, 0, w - 2).astype(np.intp)).ravel()
    flat = image.reshape(-1, channels)
    fx, fy = (x - left).reshape(-1, 1), (y - top).reshape(-1, 1)
    tl, tr, bl, br = (flat.take(idx + offset, axis=0) for offset in (0, 1, w, w + 1))
    value = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    value[~inside] = 0
    return value.reshape(*x.shape, channels).astype(np.uint8)


def extract_chip(image: np.ndarray, rect: np.ndarray, angle: float, size: int = CHIP_SIZE) -> np.ndarray:
    """One chip (size, size, 3) uint8 from an RGB uint8 image: dlib's extract_image_chip."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    details = ChipDetails(rect=np.asarray(rect, np.float64)[None], angle=np.array([angle]), size=size)
    corners = details.corners()[0]
    chip_area = size * size
    # Pyramid depth, and the margin its filters need around the rotated rectangle.
    depth, grow, down = 0, 2.0, _rect_down(details.rect[0])
    while _area(down) > chip_area:
        down, depth, grow = _rect_down(down), depth + 1, grow * 2 + 2
    l, t, r, b = details.rect[0]
    centre = np.array([(l + r) / 2, (t + b) / 2])
    br = centre * 2 - corners[0]  # the fourth corner, opposite the top-left one
    xs = np.append(corners[:, 0], br[0])
    ys = np.append(corners[:, 1], br[1])
    box = np.array([max(xs.min() - grow, 0), max(ys.min() - grow, 0),
                    min(xs.max() + grow, w - 1), min(ys.max() + grow, h - 1)])
    box = np.floor(box + 0.5).astype(np.int64)  # dlib's drectangle -> rectangle
    if box[0] > box[2] or box[1] > box[3]:
        return np.zeros((size, size, 3), np.uint8)  # the face lies wholly outside the image
    source = image[box[1]:box[3] + 1, box[0]:box[2] + 1]
    for _ in range(depth):
        source = pyramid_down(source)
    gx, gy = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    tl, tr, bl = corners
    xy = tl + gx[..., None] * (tr - tl) / (size - 1) + gy[..., None] * (bl - tl) / (size - 1)
    xy = xy - box[:2]
    for _ in range(depth):
        xy = xy / 2 - _PYRAMID_OFFSET
    return _bilinear(source, xy)


def face_chips(images: Sequence[np.ndarray], landmarks: np.ndarray, size: int = CHIP_SIZE,
               padding: float = CHIP_PADDING) -> np.ndarray:
    """(N, size, size, 3) uint8 chips, one per RGB uint8 image and its (68, 2) landmarks: what
    dlib.get_face_chip(image, shape, size, padding) gives."""
    if len(images) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    details = face_chip_details(np.asarray(landmarks, np.float64).reshape(len(images), NUM_LANDMARKS, 2),
                                size, padding)
    return np.stack([extract_chip(np.asarray(image), details.rect[i], details.angle[i], size)
                     for i, image in enumerate(images)])


def face_chip(image: np.ndarray, landmarks: np.ndarray, size: int = CHIP_SIZE,
              padding: float = CHIP_PADDING) -> np.ndarray:
    """(size, size, 3) uint8 chip of one RGB uint8 image from its (68, 2) landmarks."""
    return face_chips([image], np.asarray(landmarks)[None], size, padding)[0]
