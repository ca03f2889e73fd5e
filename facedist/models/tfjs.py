"""TF.js weights (a `*-weights_manifest.json` plus its `.bin` shards) read into numpy, no TF runtime.

A manifest is a list of groups; each group names its shard files (concatenated in order) and
its tensors in the order they are packed. A tensor with a `quantization` entry is stored as
uint8 / uint16 and dequantised as `q * scale + min` (TF.js' affine quantisation); others are
raw little-endian float32 / int32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_DTYPES = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "uint16": np.uint16}


def load_tfjs_weights(manifest: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a TF.js weights manifest, by name, as float32 (int32 kept as is).

    Raises ValueError when a shard holds more or fewer bytes than the manifest describes, so a
    truncated or mismatched file never loads silently."""
    manifest = Path(manifest)
    groups = json.loads(manifest.read_text())
    out: dict[str, np.ndarray] = {}
    for group in groups:
        data = b"".join((manifest.parent / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            dims = [int(d) for d in spec["shape"]]
            count = int(np.prod(dims)) if dims else 1
            quant = spec.get("quantization")
            stored = np.dtype(_DTYPES[quant["dtype"] if quant else spec["dtype"]])
            nbytes = count * stored.itemsize
            if offset + nbytes > len(data):
                raise ValueError(f"{manifest.name}: {spec['name']} runs past the end of its shard "
                                 f"({offset + nbytes} > {len(data)} bytes)")
            values = np.frombuffer(data, dtype=stored.newbyteorder("<"), count=count, offset=offset)
            offset += nbytes
            if quant:
                values = values.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
            elif spec["dtype"] == "float32":
                values = values.astype(np.float32)
            if spec["name"] in out:
                raise ValueError(f"{manifest.name}: tensor {spec['name']} appears twice")
            out[spec["name"]] = values.reshape(dims).copy()
        if offset != len(data):
            raise ValueError(f"{manifest.name}: {len(data) - offset} bytes left over after the last "
                             "tensor; the manifest and the .bin do not match")
    return out
