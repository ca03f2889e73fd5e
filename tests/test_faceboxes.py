"""FaceBoxes: strict load of FaceBoxesProd.pth, priors/decode/NMS against hand-worked cases and a
literal port of 3DDFA_V2's FaceBoxes.py, detections on every Yale image, batching of mixed sizes."""

from __future__ import annotations

import math
from itertools import product
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facedist import assets
from facedist.images import decode_image
from facedist.models.faceboxes import (
    FaceBoxes, FaceBoxesConfig, _anchors_within, decode_boxes, detect_faces, fuse_for_inference,
    load_faceboxes, nms, prior_boxes,
)

CHECKPOINT = "faceboxes/FaceBoxesProd.pth"


@pytest.fixture(scope="module")
def net() -> FaceBoxes:
    return load_faceboxes(assets.resolve(CHECKPOINT, allow_download=False))


@pytest.fixture(scope="module")
def fast_net(net) -> FaceBoxes:
    return fuse_for_inference(net)


@pytest.fixture(scope="module")
def yale(yale_dir) -> dict[str, np.ndarray]:
    paths = sorted(p for p in Path(yale_dir).iterdir() if p.is_file() and p.name.startswith("subject"))
    return {p.name: decode_image(p.read_bytes()) for p in paths}


# --- literal port of upstream's test path (FaceBoxes.py, prior_box.py, box_utils.decode, cpu_nms) ---

def _upstream_priors(height: int, width: int) -> torch.Tensor:
    anchors = []
    for step, min_sizes in zip((32, 64, 128), ((32, 64, 128), (256,), (512,))):
        for i, j in product(range(math.ceil(height / step)), range(math.ceil(width / step))):
            for min_size in min_sizes:
                s_kx, s_ky = min_size / width, min_size / height
                if min_size in (32, 64):
                    offsets = [0, 0.25, 0.5, 0.75] if min_size == 32 else [0, 0.5]
                    dense_cx = [x * step / width for x in [j + o for o in offsets]]
                    dense_cy = [y * step / height for y in [i + o for o in offsets]]
                    for cy, cx in product(dense_cy, dense_cx):
                        anchors += [cx, cy, s_kx, s_ky]
                else:
                    anchors += [(j + 0.5) * step / width, (i + 0.5) * step / height, s_kx, s_ky]
    return torch.Tensor(anchors).view(-1, 4)


def _upstream_decode(loc, priors, variances=(0.1, 0.2)):
    boxes = torch.cat((priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:],
                       priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])), 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _upstream_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """cpu_nms.pyx with its inner loop vectorised (same float32 arithmetic, same >= test)."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    suppressed = np.zeros(len(dets), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        rest = order[pos + 1:]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        suppressed[rest[inter / (areas[i] + areas[rest] - inter) >= thresh]] = True
    return keep


def _detect_unpadded(net: FaceBoxes, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FaceBoxes.__call__ upstream, step by step, on one image (upstream reads BGR with cv2)."""
    img_raw = np.ascontiguousarray(rgb[..., ::-1])
    h, w = img_raw.shape[:2]
    scale = 1
    if h > 720:
        scale = 720 / h
    if w * scale > 1080:
        scale *= 1080 / (w * scale)
    img = np.float32(img_raw if scale == 1 else cv2.resize(img_raw, dsize=(int(scale * w), int(scale * h))))
    im_height, im_width, _ = img.shape
    scale_bbox = torch.Tensor([img.shape[1], img.shape[0], img.shape[1], img.shape[0]])
    img -= (104, 117, 123)
    with torch.inference_mode():
        loc, conf = net(torch.from_numpy(img.transpose(2, 0, 1)).unsqueeze(0))
    boxes = _upstream_decode(loc.squeeze(0), _upstream_priors(im_height, im_width))
    boxes = (boxes * scale_bbox / scale).numpy()
    scores = conf.squeeze(0).numpy()[:, 1]
    inds = np.where(scores > 0.05)[0]
    boxes, scores = boxes[inds], scores[inds]
    order = scores.argsort()[::-1][:5000]
    dets = np.hstack((boxes[order], scores[order][:, None])).astype(np.float32, copy=False)
    dets = dets[_upstream_nms(dets, 0.3)][:750]
    dets = dets[dets[:, 4] > 0.5]
    return dets[:, :4], dets[:, 4]


# --- the network -------------------------------------------------------------------------------

def test_checkpoint_loads_strictly(net, tmp_path):
    path = assets.resolve(CHECKPOINT, allow_download=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(net.state_dict()) == set(state)
    assert sum(p.numel() for p in net.parameters()) == 1_007_330
    assert not net.training
    # DataParallel-style checkpoints ({'state_dict': {'module.*': ...}}) load too, and strictly.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    reloaded = load_faceboxes(wrapped)
    assert torch.equal(reloaded.conv1.conv.weight, net.conv1.conv.weight)
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("conf.2")}, broken)
    with pytest.raises(RuntimeError, match="conf.2"):
        load_faceboxes(broken)


def test_output_shapes(net):
    with torch.inference_mode():
        loc, conf = net(torch.randn(2, 3, 240, 320))
    # 8x10 cells x 21 anchors + 4x5 + 2x3
    assert loc.shape == (2, 1706, 4) and conf.shape == (2, 1706, 2)
    assert torch.allclose(conf.sum(-1), torch.ones(2, 1706))


@pytest.mark.parametrize("height, width", [(243, 320), (480, 640), (1000, 700)])
def test_priors_line_up_with_network_rows_and_upstream(net, height, width):
    priors = prior_boxes(height, width)
    with torch.inference_mode():
        loc, _ = net(torch.zeros(1, 3, height, width))
    assert priors.shape == (loc.shape[1], 4)
    assert torch.equal(priors, _upstream_priors(height, width))


def test_prior_order_worked_by_hand():
    """A 32 x 64 (h x w) input: two first-level cells, then one cell on each other level."""
    p = prior_boxes(32, 64)
    assert p.shape == (2 * 21 + 1 + 1, 4)
    quarter = (0.0, 0.25, 0.5, 0.75)
    dense32 = [[dx * 32 / 64, dy, 0.5, 1.0] for dy in quarter for dx in quarter]  # rows outer
    dense64 = [[dx * 32 / 64, dy, 1.0, 2.0] for dy in (0.0, 0.5) for dx in (0.0, 0.5)]
    first_cell = dense32 + dense64 + [[0.25, 0.5, 2.0, 4.0]]
    assert torch.equal(p[:21], torch.tensor(first_cell))
    assert torch.equal(p[21], torch.tensor([0.5, 0.0, 0.5, 1.0]))  # second cell (column 1) starts over
    assert torch.equal(p[41], torch.tensor([0.75, 0.5, 2.0, 4.0]))
    assert torch.equal(p[42], torch.tensor([0.5, 1.0, 4.0, 8.0]))    # 256 px anchor, stride 64
    assert torch.equal(p[43], torch.tensor([1.0, 2.0, 8.0, 16.0]))   # 512 px anchor, stride 128


def test_anchors_of_a_coarser_padding_are_the_images_own():
    """Padding 243 x 320 to multiples of 128 (256 x 384) adds two columns of first-level cells; the
    anchors kept for the image are its own, at the same pixel positions."""
    assert _anchors_within(256, 320, 243, 320) is None  # multiples of 32 never add cells
    within = _anchors_within(256, 384, 243, 320)
    own = prior_boxes(243, 320) * torch.tensor([320.0, 243.0, 320.0, 243.0])
    padded = prior_boxes(256, 384) * torch.tensor([384.0, 256.0, 384.0, 256.0])
    assert within.shape == (padded.shape[0],) and int(within.sum()) == own.shape[0] < padded.shape[0]
    torch.testing.assert_close(padded[within], own)


def test_decode_worked_by_hand():
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.3, 0.4]])
    loc = torch.tensor([[1.0, -1.0, math.log(2) / 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # centre (0.5 + 0.1*0.2, 0.5 - 0.1*0.4) = (0.52, 0.46); size (0.2*2, 0.4) = (0.4, 0.4)
    expected = torch.tensor([[0.32, 0.26, 0.72, 0.66], [-0.05, 0.0, 0.25, 0.4]])
    assert torch.allclose(decode_boxes(loc, priors), expected, atol=1e-6)
    batched = decode_boxes(loc[None].repeat(3, 1, 1), priors)  # (B, N, 4) against shared priors
    assert torch.allclose(batched, expected.expand(3, 2, 4), atol=1e-6)


def test_nms_worked_by_hand():
    boxes = torch.tensor([
        [0, 0, 9, 9],            # 0: kept
        [1, 0, 10, 9],           # 1: IoU with 0 = 90/110 -> suppressed
        [20, 20, 29, 29],        # 2: disjoint, best score -> first
        [6, 0, 15, 9],           # 3: IoU 40/160 with 0 -> kept, although 50/150 with the suppressed 1
        [100, 100, 102, 102],    # 4: kept
        [101.5, 100, 103.5, 102],  # 5: IoU 4.5/13.5 with 4 only with the "+1" pixel convention
    ], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.95, 0.7, 0.6, 0.5])
    assert nms(boxes, scores, 0.3).tolist() == [2, 0, 3, 4]
    assert nms(boxes, scores, 0.9).tolist() == [2, 0, 1, 3, 4, 5]
    assert nms(boxes[:0], scores[:0], 0.3).tolist() == []


def test_nms_matches_upstream_on_random_boxes():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (600, 2))
    wh = rng.uniform(5, 60, (600, 2))
    boxes = np.hstack([xy, xy + wh]).astype(np.float32)
    scores = rng.uniform(0, 1, 600).astype(np.float32)
    expected = _upstream_nms(np.hstack([boxes, scores[:, None]]), 0.3)
    kept = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3).tolist()
    assert 10 < len(kept) < 600 and kept == expected


# --- detection ---------------------------------------------------------------------------------

def test_a_face_in_every_yale_image(fast_net, yale):
    results = detect_faces(fast_net, list(yale.values()))
    found = sum(len(scores) > 0 for _, scores in results)
    print(f"faces found in {found}/{len(yale)} Yale images")
    assert len(yale) == 164
    assert [name for name, (_, s) in zip(yale, results) if len(s) == 0] == []
    for (name, image), (boxes, scores) in zip(yale.items(), results):
        assert boxes.dtype == np.float32 and scores.dtype == np.float32 and boxes.shape == (len(scores), 4)
        assert np.all(np.diff(scores) <= 0) and scores[0] > 0.5
        h, w = image.shape[:2]
        x0, y0, x1, y1 = boxes[0]
        assert 0.2 * w < (x0 + x1) / 2 < 0.8 * w and 0.2 * h < (y0 + y1) / 2 < 0.8 * h, name
        assert 0.2 * h < y1 - y0 < 0.95 * h and 0.2 * h < x1 - x0 < 0.95 * h, name


def _varied_images(yale: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Yale images at their own 243 x 320 and resized: sizes that share padded frames (256 x 320,
    480 x 640), odd sizes, and one past the 720 x 1080 bound (shrunk to 720 x 1080 first)."""
    names = sorted(yale)[::12]
    sizes = [None, (250, 300), (480, 640), (230, 310), (700, 500), (470, 630), (150, 200),
             (1000, 1500), (300, 260), (256, 320), None, (461, 617)]
    return [yale[n] if size is None else cv2.resize(yale[n], (size[1], size[0]))
            for n, size in zip(names, sizes)]


def test_masked_padded_forward_equals_forward_alone(net, yale):
    """Two images padded into one 256 x 320 batch give each image's own outputs (every row)."""
    images = [yale[n] for n in sorted(yale)[:2]]
    images[1] = cv2.resize(images[1], (300, 250))
    alone, batch = [], torch.zeros(2, 3, 256, 320)
    for k, rgb in enumerate(images):
        x = torch.from_numpy(rgb[..., ::-1].astype(np.float32) - np.float32([104, 117, 123]))
        batch[k, :, :x.shape[0], :x.shape[1]] = x.permute(2, 0, 1)
        with torch.inference_mode():
            alone.append(net(x.permute(2, 0, 1)[None]))
    with torch.inference_mode():
        loc, conf = net(batch, torch.tensor([im.shape[:2] for im in images]))
        unmasked_loc, _ = net(batch)
    for k, (alone_loc, alone_conf) in enumerate(alone):
        assert alone_loc.shape[1] == loc.shape[1] == 1706  # same grid: ceil(ceil(h / 32) / 2) = ceil(h / 64)
        torch.testing.assert_close(loc[k], alone_loc[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(conf[k], alone_conf[0], atol=1e-5, rtol=1e-4)
    assert (unmasked_loc[0] - alone[0][0][0]).abs().max() > 0.1  # what the masks are for


@pytest.mark.parametrize("size_multiple", [32, 128])
def test_detections_are_upstreams_for_each_image(net, yale, size_multiple):
    images = _varied_images(yale)
    results = detect_faces(net, images, FaceBoxesConfig(size_multiple=size_multiple), max_batch=4)
    for image, (boxes, scores) in zip(images, results):
        ref_boxes, ref_scores = _detect_unpadded(net, image)
        assert len(scores) == len(ref_scores) >= 1
        np.testing.assert_allclose(boxes, ref_boxes, atol=0.05)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4)


def test_mixed_size_batch_equals_one_at_a_time(fast_net, yale):
    images = _varied_images(yale) + [yale[n] for n in sorted(yale)[1:6]]
    batched = detect_faces(fast_net, images, max_batch=3)
    assert len(batched) == len(images)
    for image, (boxes, scores) in zip(images, batched):
        (alone_boxes, alone_scores), = detect_faces(fast_net, [image])
        assert len(scores) == len(alone_scores) >= 1
        np.testing.assert_allclose(boxes, alone_boxes, atol=0.05)
        np.testing.assert_allclose(scores, alone_scores, atol=1e-4)


def test_fused_net_detects_the_same(net, fast_net, yale):
    images = [yale[n] for n in sorted(yale)[::20]]
    for (boxes, scores), (fused_boxes, fused_scores) in zip(detect_faces(net, images),
                                                             detect_faces(fast_net, images)):
        assert len(scores) == len(fused_scores) >= 1
        np.testing.assert_allclose(fused_boxes, boxes, atol=0.5)
    assert "conv1.bn.running_mean" in net.state_dict()  # the loaded model is left as it was


def test_empty_batch_and_bad_images(fast_net):
    assert detect_faces(fast_net, []) == []
    good = np.zeros((64, 64, 3), np.uint8)
    for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8),
                np.zeros((64, 64, 3), np.float32), [[0, 0, 0]]):
        with pytest.raises(ValueError, match="image 1"):
            detect_faces(fast_net, [good, bad])
    (boxes, scores), = detect_faces(fast_net, [good])
    assert boxes.shape == (0, 4) and scores.shape == (0,)
