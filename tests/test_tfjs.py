"""facedist.models.tfjs: TF.js manifests + .bin shards, written here byte by byte, read back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facedist.models.tfjs import load_tfjs_weights


def write_model(folder, *, shards: int = 1, drop_bytes: int = 0, extra_bytes: int = 0):
    """A manifest of two tensors, "q" uint8-quantised (2x3) and "f" raw float32 (4,), and their
    bytes split over `shards` files; returns (manifest path, expected q, expected f)."""
    q_codes = np.array([[0, 1, 2], [128, 254, 255]], np.uint8)
    scale, minimum = 0.5, -3.0
    f = np.array([1.5, -2.25, 1e-3, 7.0], np.float32)
    data = q_codes.tobytes() + f.astype("<f4").tobytes()
    data = data[:len(data) - drop_bytes] + b"\0" * extra_bytes
    cut = [round(i * len(data) / shards) for i in range(shards + 1)]
    paths = []
    for i in range(shards):
        name = f"model-shard{i + 1}of{shards}.bin"
        (folder / name).write_bytes(data[cut[i]:cut[i + 1]])
        paths.append(name)
    manifest = [{"paths": paths, "weights": [
        {"name": "block/q", "shape": [2, 3], "dtype": "float32",
         "quantization": {"dtype": "uint8", "scale": scale, "min": minimum}},
        {"name": "block/f", "shape": [4], "dtype": "float32"},
    ]}]
    path = folder / "model-weights_manifest.json"
    path.write_text(json.dumps(manifest))
    return path, q_codes.astype(np.float32) * scale + minimum, f


@pytest.mark.parametrize("shards", [1, 3])
def test_quantised_and_float_tensors_read_back(tmp_path, shards):
    manifest, q, f = write_model(tmp_path, shards=shards)
    weights = load_tfjs_weights(manifest)
    assert set(weights) == {"block/q", "block/f"}
    assert weights["block/q"].dtype == np.float32 and weights["block/q"].shape == (2, 3)
    np.testing.assert_array_equal(weights["block/q"], q)  # q * 0.5 - 3: exact in float32
    np.testing.assert_array_equal(weights["block/f"], f)


def test_a_truncated_bin_is_refused(tmp_path):
    manifest, _, _ = write_model(tmp_path, drop_bytes=3)
    with pytest.raises(ValueError, match="runs past the end"):
        load_tfjs_weights(manifest)


def test_a_bin_longer_than_its_manifest_is_refused(tmp_path):
    manifest, _, _ = write_model(tmp_path, extra_bytes=4)
    with pytest.raises(ValueError, match="left over"):
        load_tfjs_weights(manifest)
