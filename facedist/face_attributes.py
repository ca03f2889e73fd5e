"""Face attributes from face-api's nets: expression (7 classes and a 256-d feature), age, gender.

  * faceapi_inputs      images + one face box each -> the nets' 112x112 input, batched
  * FaceAttributeNets   both nets loaded once (model files via facedist.assets), predict()

The boxes are facedist's detector's (FaceBoxes by default, x0, y0, x1, y1 in pixels). face-api
itself runs its own detector and, when no landmarks were asked for (with them it crops the box
around its 68 points instead), crops as ``square="pad"`` does here: the box clipped to
the image and floored (Box.clipAtImageBorders), the crop padded with black to a square, equally on
both sides of the short axis (padToSquare with centring; an odd pixel goes after), and resized to 112
with TF's bilinear resize (no half-pixel centres, no antialiasing: tf.image.resizeBilinear's
defaults). ``square="box"`` instead squares the box about its centre (face-api's Box.toSquare) and
crops that from the image, black outside it, so the face fills the input with image context
instead of black bars.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from facedist import assets
from facedist.images import as_rgb_uint8
from facedist.models.faceapi import (AGE_GENDER_MANIFEST, EXPRESSION_MANIFEST, GENDERS, INPUT_SIZE,
                                     faceapi_age_gender, faceapi_expression, weights_of)
from facedist.models.layers import full_precision
from facedist.schema import FACEAPI_EXPRESSIONS

SQUARE_MODES = ("pad", "box")


def _resize_bilinear_tf(image: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) float32 -> (size, size, 3): tf.image.resizeBilinear with align_corners=False and
    half_pixel_centers=False, which samples source pixel out * (in / size), clamped at the edge."""

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.arange(size, dtype=np.float64) * (n_in / size)
        low = np.floor(source).astype(np.int64)
        return low, np.minimum(low + 1, n_in - 1), (source - low).astype(np.float32)

    top, bottom, row_lerp = taps(image.shape[0])
    left, right, col_lerp = taps(image.shape[1])
    col_lerp = col_lerp[None, :, None]
    # Columns first, then rows, in the order tfjs's CPU kernel combines the four taps.
    upper = image[top][:, left] + (image[top][:, right] - image[top][:, left]) * col_lerp
    lower = image[bottom][:, left] + (image[bottom][:, right] - image[bottom][:, left]) * col_lerp
    return upper + (lower - upper) * row_lerp[:, None, None]


def _crop_pad(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
    """face-api's crop: clip the box at the image borders, floor, pad to a centred square."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = max(x0, 0.0), max(y0, 0.0)
    cw, ch = min(x1 - cx, width - cx), min(y1 - cy, height - cy)
    cx, cy, cw, ch = (math.floor(v) for v in (cx, cy, cw, ch))
    if cw < 1 or ch < 1:
        raise ValueError(f"face box {tuple(box)} lies outside the {width}x{height} image")
    crop = rgb[cy:cy + ch, cx:cx + cw].astype(np.float32)
    diff = abs(ch - cw)
    after = math.floor(diff * 0.5 + 0.5)  # JS Math.round
    before = diff - after
    pad = ((0, 0), (before, after), (0, 0)) if ch > cw else ((before, after), (0, 0), (0, 0))
    return np.pad(crop, pad) if diff else crop


def _crop_box(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box squared about its centre (longer side kept), cut from the image, black outside."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    left = math.floor((x0 + x1 - side) / 2)
    top = math.floor((y0 + y1 - side) / 2)
    side = max(math.floor(side), 1)
    out = np.zeros((side, side, 3), np.float32)
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + side, width), min(top + side, height)
    if sx1 <= sx0 or sy1 <= sy0:
        raise ValueError(f"face box {tuple(box)} lies outside the {width}x{height} image")
    out[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = rgb[sy0:sy1, sx0:sx1]
    return out


def faceapi_inputs(images: Sequence[np.ndarray], boxes, square: str = "pad") -> np.ndarray:
    """One face per image: RGB uint8 images (greyscale is replicated) and their face boxes
    (N, 4) x0, y0, x1, y1 -> (N, 3, 112, 112) float32 RGB 0..255, the input of both nets."""
    if square not in SQUARE_MODES:
        raise ValueError(f"unknown square mode {square!r}; choose one of {SQUARE_MODES}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) != len(images):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes; give one box per image")
    crop = _crop_pad if square == "pad" else _crop_box
    out = np.empty((len(images), 3, INPUT_SIZE, INPUT_SIZE), np.float32)
    for i, (image, box) in enumerate(zip(images, boxes)):
        out[i] = _resize_bilinear_tf(crop(as_rgb_uint8(image), box), INPUT_SIZE).transpose(2, 0, 1)
    return out


class FaceAttributeNets:
    """face-api's expression and age/gender nets, loaded once, run together on one input batch.

    predict(images, boxes) -> dict of numpy arrays:
        expression_feature  (N, 256) the expression net's pooled feature (what its fc reads)
        expression_logits   (N, 7)   in FACEAPI_EXPRESSIONS order
        expression_probs    (N, 7)   softmax of the logits (face-api's output)
        faceapi_age         (N,)     years
        faceapi_gender_male (N,)     softmax of the gender head, male entry (face-api's probMale)

    version names both nets' weights and the crop (recorded in the coefficients' layout).
    """

    expressions = FACEAPI_EXPRESSIONS

    def __init__(self, device: str = "cpu", *, square: str = "pad", batch_size: int | None = None):
        if square not in SQUARE_MODES:
            raise ValueError(f"unknown square mode {square!r}; choose one of {SQUARE_MODES}")
        self.device = torch.device(device)
        self.square = square
        self.batch_size = batch_size or (32 if self.device.type == "cpu" else 256)
        # Channels-last: torch's depthwise and 1x1 convs run faster that way, most at batch > 1.
        self.expression_net = faceapi_expression(pretrained=True).to(self.device, memory_format=torch.channels_last)
        self.age_gender_net = faceapi_age_gender(pretrained=True).to(self.device, memory_format=torch.channels_last)
        sha = {m: assets.sha256_of(assets.resolve(weights_of(m)))[:12]
               for m in (EXPRESSION_MANIFEST, AGE_GENDER_MANIFEST)}
        self.version = (f"faceapi_expression:{sha[EXPRESSION_MANIFEST]}+faceapi_age_gender:{sha[AGE_GENDER_MANIFEST]}"
                        f":{INPUT_SIZE}{square}")

    def predict_inputs(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The nets on prepared inputs, (N, 3, 112, 112) float RGB 0..255 (see faceapi_inputs)."""
        inputs = np.asarray(inputs, dtype=np.float32)  # the nets check the shape
        features, logits, ages, genders = [], [], [], []
        with torch.inference_mode(), full_precision():  # the same outputs on a GPU as on a CPU
            for start in range(0, len(inputs), self.batch_size):
                x = torch.from_numpy(inputs[start:start + self.batch_size]).to(
                    self.device, memory_format=torch.channels_last)
                feature = self.expression_net.forward_features(x)
                age, gender = self.age_gender_net(x)
                features.append(feature.cpu().numpy())
                logits.append(self.expression_net.forward_head(feature).cpu().numpy())
                ages.append(age.cpu().numpy())
                genders.append(gender.cpu().numpy())
        n_features, n_classes = self.expression_net.num_features, len(FACEAPI_EXPRESSIONS)
        logits = np.concatenate(logits) if logits else np.zeros((0, n_classes), np.float32)
        gender_logits = np.concatenate(genders) if genders else np.zeros((0, 2), np.float32)
        return {
            "expression_feature": np.concatenate(features) if features else np.zeros((0, n_features), np.float32),
            "expression_logits": logits,
            "expression_probs": _softmax(logits),
            "faceapi_age": np.concatenate(ages) if ages else np.zeros(0, np.float32),
            "faceapi_gender_male": _softmax(gender_logits)[:, GENDERS.index("male")],
        }

    def predict(self, images: Sequence[np.ndarray], boxes) -> dict[str, np.ndarray]:
        """One face per image: RGB uint8 images and their boxes (N, 4) x0, y0, x1, y1."""
        return self.predict_inputs(faceapi_inputs(images, boxes, square=self.square))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
