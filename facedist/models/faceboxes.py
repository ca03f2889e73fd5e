"""FaceBoxes face detector as 3DDFA_V2 ships it (FaceBoxes/ upstream), in plain torch.

The network (models/faceboxes.py upstream) keeps upstream's module names, so FaceBoxesProd.pth loads
strictly. The rest ports upstream's test-time path: prior boxes (utils/prior_box.py with
utils/config.py), SSD box decoding with variances (0.1, 0.2) (utils/box_utils.py decode), greedy NMS
with the Fast R-CNN "+1" pixel convention (utils/nms/cpu_nms.pyx) and FaceBoxes.py's thresholds and
downscale to fit 720 x 1080. detect_faces adds batching: images whose resized sizes pad to the same
multiple of 32 run in one forward, with the padding masked out of the features so that each image
still gets the detections upstream gives it alone.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facedist.models.layers import fold_bn

# utils/config.py upstream: anchor sizes per detection level and the level's stride, in pixels.
_MIN_SIZES = ((32, 64, 128), (256,), (512,))
_STEPS = (32, 64, 128)
VARIANCES = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)
_BGR_MEAN = (*BGR_MEAN, 0.0)  # a cv2 scalar: cv2.subtract is far cheaper than numpy's broadcast


class BasicConv2d(nn.Module):
    """Conv (no bias) + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class CRelu(nn.Module):
    """Conv + BN, then ReLU of [x, -x]: twice the channels for the cost of one conv."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(torch.cat([x, -x], 1), inplace=True)


class Inception(nn.Module):
    """128 -> 128 channels: 1x1, avgpool+1x1, 1x1+3x3, 1x1+3x3+3x3 branches of 32 each."""

    def __init__(self):
        super().__init__()
        self.branch1x1 = BasicConv2d(128, 32, kernel_size=1, padding=0)
        self.branch1x1_2 = BasicConv2d(128, 32, kernel_size=1, padding=0)
        self.branch3x3_reduce = BasicConv2d(128, 24, kernel_size=1, padding=0)
        self.branch3x3 = BasicConv2d(24, 32, kernel_size=3, padding=1)
        self.branch3x3_reduce_2 = BasicConv2d(128, 24, kernel_size=1, padding=0)
        self.branch3x3_2 = BasicConv2d(24, 32, kernel_size=3, padding=1)
        self.branch3x3_3 = BasicConv2d(32, 32, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x must be zero outside the valid region that `mask` (see FaceBoxes.forward) marks."""
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        return _masked(torch.cat([
            self.branch1x1(x),
            self.branch1x1_2(pooled),
            self.branch3x3(_masked(self.branch3x3_reduce(x), mask)),
            self.branch3x3_3(_masked(self.branch3x3_2(_masked(self.branch3x3_reduce_2(x), mask)), mask)),
        ], 1), mask)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _valid_mask(sizes: torch.Tensor, stride: int, height: int, width: int,
                dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, height, width) 1/0 multiplier for a feature map at `stride`: 1 on the first
    ceil(h / stride) rows and ceil(w / stride) columns, the features of each image's (h, w) in sizes."""
    limits = torch.div(sizes + (stride - 1), stride, rounding_mode="floor")
    rows = torch.arange(height, device=sizes.device) < limits[:, :1]
    cols = torch.arange(width, device=sizes.device) < limits[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[:, None].to(dtype)


class FaceBoxes(nn.Module):
    """FaceBoxesNet (phase 'test', 2 classes). Input: (B, 3, H, W) float BGR minus BGR_MEAN, any H, W.

    Three detection levels at strides 32, 64 and 128; each level's map is ceil(H / stride) x
    ceil(W / stride), so the rows of loc/conf line up with prior_boxes(H, W) for every input size.
    """

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.conv1 = CRelu(3, 24, kernel_size=7, stride=4, padding=3)
        self.conv2 = CRelu(48, 64, kernel_size=5, stride=2, padding=2)
        self.inception1 = Inception()
        self.inception2 = Inception()
        self.inception3 = Inception()
        self.conv3_1 = BasicConv2d(128, 128, kernel_size=1, stride=1, padding=0)
        self.conv3_2 = BasicConv2d(128, 256, kernel_size=3, stride=2, padding=1)
        self.conv4_1 = BasicConv2d(256, 128, kernel_size=1, stride=1, padding=0)
        self.conv4_2 = BasicConv2d(128, 256, kernel_size=3, stride=2, padding=1)
        # Anchors per cell: 21 on the first level (16 + 4 + 1, see prior_boxes), 1 on the others.
        self.loc = nn.Sequential(nn.Conv2d(128, 21 * 4, 3, padding=1), nn.Conv2d(256, 4, 3, padding=1),
                                 nn.Conv2d(256, 4, 3, padding=1))
        self.conf = nn.Sequential(nn.Conv2d(128, 21 * self.num_classes, 3, padding=1),
                                  nn.Conv2d(256, self.num_classes, 3, padding=1),
                                  nn.Conv2d(256, self.num_classes, 3, padding=1))

    def forward(self, x: torch.Tensor,
                sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loc (B, N, 4) encoded offsets, conf (B, N, 2) softmax; column 1 is 'face').

        sizes (B, 2) int, optional: each image's (height, width) when images of different sizes are
        padded into one batch at the bottom/right with zeros. Features beyond each image's extent are
        then zeroed before every spatial conv/pool, which is what upstream's zero padding gives an
        image run alone (max-pool pads with -inf, but its inputs are ReLU outputs, >= 0): every cell
        within the image gets exactly its unpadded outputs."""
        masks = dict.fromkeys((4, 8, 16, 32, 64, 128))
        if sizes is not None:
            sizes, (h, w) = sizes.to(x.device), x.shape[2:]
            for stride in masks:  # feature maps are ceil(H / stride) x ceil(W / stride)
                masks[stride] = _valid_mask(sizes, stride, -(-h // stride), -(-w // stride), x.dtype)
        x = _masked(self.conv1(x), masks[4])
        x = _masked(F.max_pool2d(x, kernel_size=3, stride=2, padding=1), masks[8])
        x = _masked(self.conv2(x), masks[16])
        x = _masked(F.max_pool2d(x, kernel_size=3, stride=2, padding=1), masks[32])
        level1 = self.inception3(self.inception2(self.inception1(x, masks[32]), masks[32]), masks[32])
        level2 = _masked(self.conv3_2(_masked(self.conv3_1(level1), masks[32])), masks[64])
        level3 = _masked(self.conv4_2(_masked(self.conv4_1(level2), masks[64])), masks[128])
        batch = x.shape[0]
        # NHWC flattening puts a cell's anchors together, cells in row-major order: prior_boxes' order.
        loc = torch.cat([head(src).permute(0, 2, 3, 1).reshape(batch, -1)
                         for src, head in zip((level1, level2, level3), self.loc)], 1)
        conf = torch.cat([head(src).permute(0, 2, 3, 1).reshape(batch, -1)
                          for src, head in zip((level1, level2, level3), self.conf)], 1)
        return loc.view(batch, -1, 4), F.softmax(conf.view(batch, -1, self.num_classes), dim=-1)


def fuse_for_inference(net: FaceBoxes) -> FaceBoxes:
    """An inference copy with every BN folded into its conv, in channels-last memory: faster on
    CPU (one pass fewer over each activation; benchmarks/extract_single.py times detection).
    Channels-last input, which detect_faces passes to either model, matters more (oneDNN prefers
    NHWC).
    Its state dict no longer matches the checkpoint: keep the loaded model for saving/loading."""
    fused = copy.deepcopy(net).eval()
    for module in fused.modules():
        if isinstance(module, (BasicConv2d, CRelu)):
            module.conv, module.bn = fold_bn(module.conv, module.bn), nn.Identity()
    return fused.to(memory_format=torch.channels_last)


def load_faceboxes(path: str | Path, device: str | torch.device = "cpu") -> FaceBoxes:
    """Build the detector for FaceBoxesProd.pth (a bare state dict, or {'state_dict': ...}, keys
    possibly prefixed 'module.') and load it strictly, in eval mode."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    net = FaceBoxes()
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def _cell_anchors(min_sizes: Sequence[int]) -> list[tuple[float, float, int]]:
    """(dx, dy, size) of one cell's anchors in upstream order. Small anchors are densified so that
    they tile as densely as the large ones: 32 px on a 4x4 sub-grid, 64 px on 2x2, the rest once at
    the cell centre; within a sub-grid rows (dy) are the outer loop."""
    anchors = []
    for size in min_sizes:
        offsets = {32: (0.0, 0.25, 0.5, 0.75), 64: (0.0, 0.5)}.get(size)
        if offsets is None:
            anchors.append((0.5, 0.5, size))
        else:
            anchors += [(dx, dy, size) for dy in offsets for dx in offsets]
    return anchors


@lru_cache(maxsize=32)
def _prior_boxes_cpu(height: int, width: int) -> torch.Tensor:
    levels = []
    for step, min_sizes in zip(_STEPS, _MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        dx, dy, size = torch.tensor(_cell_anchors(min_sizes), dtype=torch.float64).T
        i = torch.arange(rows, dtype=torch.float64)[:, None, None]
        j = torch.arange(cols, dtype=torch.float64)[None, :, None]
        # Same float64 operation order as upstream's Python floats, so float32 results are identical.
        cx = ((j + dx) * step / width).expand(rows, cols, -1)
        cy = ((i + dy) * step / height).expand(rows, cols, -1)
        w = (size / width).expand(rows, cols, -1)
        h = (size / height).expand(rows, cols, -1)
        levels.append(torch.stack([cx, cy, w, h], dim=-1).reshape(-1, 4))
    return torch.cat(levels).float()


def prior_boxes(height: int, width: int, device: str | torch.device | None = None) -> torch.Tensor:
    """Anchors for an input of height x width: (N, 4) cx, cy, w, h as fractions of the width and
    height, in the order of the network's outputs (level, then row, column, then the cell's anchors).
    Not clipped to [0, 1] (upstream's clip is False)."""
    priors = _prior_boxes_cpu(int(height), int(width))
    return priors.to(device) if device is not None and torch.device(device).type != "cpu" else priors.clone()


@lru_cache(maxsize=64)
def _anchors_within(height: int, width: int, image_height: int, image_width: int) -> torch.Tensor | None:
    """For priors of a padded height x width frame: which belong to the cells upstream has for an
    image_height x image_width image (None: all do, as always when padding to multiples of 32)."""
    within, extra = [], False
    for step, min_sizes in zip(_STEPS, _MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        own_rows, own_cols = math.ceil(image_height / step), math.ceil(image_width / step)
        extra |= (rows, cols) != (own_rows, own_cols)
        cells = (torch.arange(rows)[:, None] < own_rows) & (torch.arange(cols)[None, :] < own_cols)
        within.append(cells[:, :, None].expand(-1, -1, len(_cell_anchors(min_sizes))).reshape(-1))
    return torch.cat(within) if extra else None


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor,
                 variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """SSD decoding: loc (..., N, 4) offsets against priors (N, 4) cx, cy, w, h -> (..., N, 4)
    x0, y0, x1, y1 in the priors' (normalised) units. Same float operation order as upstream."""
    centers = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    top_left = centers - sizes / 2
    return torch.cat([top_left, top_left + sizes], dim=-1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS as upstream's cpu_nms: boxes (n, 4) x0, y0, x1, y1 in pixels; a box is dropped when
    its IoU with a kept, higher-scoring box is >= threshold. IoU uses the "+1" convention (a box
    spans x1 - x0 + 1 pixels), computed in float32 like upstream. Returns the kept indices (int64),
    in descending score order (ties keep input order)."""
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].float()
    x0, y0, x1, y1 = b.unbind(1)
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    overlapping = np.empty((n, n), dtype=bool)
    rows = max(1, (1 << 22) // n)  # bound the float IoU block to ~16 MB for n up to top_k
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        w = (torch.minimum(x1[sl, None], x1) - torch.maximum(x0[sl, None], x0) + 1).clamp_(min=0)
        h = (torch.minimum(y1[sl, None], y1) - torch.maximum(y0[sl, None], y0) + 1).clamp_(min=0)
        inter = w * h
        overlapping[sl] = (inter / (areas[sl, None] + areas - inter) >= threshold).cpu().numpy()
    # The scan is sequential (a box only suppresses if it was kept): a cheap loop over bool rows.
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if not suppressed[i]:
            keep.append(i)
            suppressed[i + 1:] |= overlapping[i, i + 1:]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


@dataclass
class FaceBoxesConfig:
    """FaceBoxes.py's test-time settings. Images larger than max_height x max_width are shrunk to
    fit (never enlarged); boxes scoring above confidence_threshold go, top_k at most, through NMS,
    keep_top_k survive and those scoring above score_threshold (upstream's vis_thres) are returned."""

    max_height: int = 720
    max_width: int = 1080
    confidence_threshold: float = 0.05
    top_k: int = 5000
    nms_threshold: float = 0.3
    keep_top_k: int = 750
    score_threshold: float = 0.5
    size_multiple: int = 32  # resized images are padded up to a multiple of this, to batch them


def detection_scale(height: int, width: int, max_height: int = 720, max_width: int = 1080) -> float:
    """Upstream's factor to shrink an image to fit max_height x max_width (1.0 if it fits)."""
    scale = 1.0
    if height > max_height:
        scale = max_height / height
    if width * scale > max_width:
        scale *= max_width / (width * scale)
    return scale


def _resize(image: np.ndarray, config: FaceBoxesConfig) -> tuple[np.ndarray, float]:
    """(image shrunk as upstream does, scale): cv2.resize to (int(scale * h), int(scale * w))."""
    h, w = image.shape[:2]
    scale = detection_scale(h, w, config.max_height, config.max_width)
    if scale != 1:
        image = cv2.resize(image, dsize=(int(scale * w), int(scale * h)))
    return image, scale


def _postprocess(boxes: torch.Tensor, scores: torch.Tensor,
                 config: FaceBoxesConfig) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's filtering of one image's decoded boxes (pixels) and face scores.

    Upstream thresholds at confidence_threshold, runs NMS, keeps keep_top_k and only then drops
    scores <= score_threshold. Greedy NMS decides each box from higher-scoring boxes alone, and its
    output is in score order, so thresholding at the larger of the two first gives the same boxes
    while NMS sees far fewer candidates."""
    threshold = max(config.confidence_threshold, config.score_threshold)
    candidates = torch.nonzero(scores > threshold).squeeze(1)
    order = torch.sort(scores[candidates], descending=True, stable=True).indices[:config.top_k]
    candidates = candidates[order]
    keep = candidates[nms(boxes[candidates], scores[candidates], config.nms_threshold)][:config.keep_top_k]
    return (boxes[keep].cpu().numpy().astype(np.float32, copy=False),
            scores[keep].cpu().numpy().astype(np.float32, copy=False))


def detect_faces(net: FaceBoxes, images: Sequence[np.ndarray], config: FaceBoxesConfig = FaceBoxesConfig(),
                 device: str | torch.device | None = None,
                 max_batch: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """Faces in RGB uint8 (H, W, 3) images of any sizes: per image, in input order, (boxes (n, 4)
    float32 x0, y0, x1, y1 in the image's pixels, scores (n,) float32), by descending score.

    Each image is prepared as upstream (shrunk to fit, BGR, minus the mean), then padded at the
    bottom/right with the mean colour (zeros) to a multiple of config.size_multiple, and images
    with the same padded size run as one batch of up to max_batch (a batch of one size runs
    unpadded). The network masks the padding out of its features (FaceBoxes.forward's sizes) and
    the anchors' pixel positions do not depend on the frame, so the detections are upstream's for
    the image alone, to float rounding; unmasked, the padding would move the boxes of faces that
    touch the image border. Multiples of 32 add no anchors; with other multiples the extra cells
    are ignored.

    Pass fuse_for_inference(net) for speed on CPU. Runs on `device`, default the net's."""
    for k, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"image {k}: expected an RGB uint8 (H, W, 3) array, got {desc}")
    if device is None:
        device = next(net.parameters()).device
    multiple = max(1, int(config.size_multiple))
    resized = [_resize(image, config) for image in images]
    buckets: dict[tuple[int, int], list[int]] = {}
    for k, (rgb, _) in enumerate(resized):
        h, w = rgb.shape[:2]
        buckets.setdefault((-(-h // multiple) * multiple, -(-w // multiple) * multiple), []).append(k)

    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(images)
    with torch.inference_mode():
        for bucket, members in buckets.items():
            members.sort(key=lambda k: resized[k][0].shape[:2])  # same sizes end up in the same chunks
            for start in range(0, len(members), max_batch):
                chunk = members[start:start + max_batch]
                sizes = [resized[k][0].shape[:2] for k in chunk]
                padded = len(set(sizes)) > 1  # one size: run it unpadded (and unmasked), as upstream
                height, width = bucket if padded else sizes[0]
                batch = np.zeros((len(chunk), height, width, 3), dtype=np.float32)
                for row, k in enumerate(chunk):
                    rgb = resized[k][0]
                    bgr = cv2.subtract(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), _BGR_MEAN, dtype=cv2.CV_32F)
                    batch[row, :rgb.shape[0], :rgb.shape[1]] = bgr
                # NHWC memory viewed as NCHW (channels-last strides): no copy for a channels-last net.
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
                loc, conf = net(x, torch.tensor(sizes, device=device) if padded else None)
                frame = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
                boxes = decode_boxes(loc, prior_boxes(height, width, device)) * frame
                for row, k in enumerate(chunk):
                    scores = conf[row, :, 1]
                    within = _anchors_within(height, width, *sizes[row])
                    if within is not None:  # cells upstream would not have: no detections there
                        scores = scores * within.to(device)
                    results[k] = _postprocess(boxes[row] / resized[k][1], scores, config)
    return results  # type: ignore[return-value]
