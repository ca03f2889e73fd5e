"""Face embeddings: dlib's 128-d ResNet face descriptor on torch, from images and 68 landmarks.

FaceDescriptor loads the network once (face-api's weights, resolved through facedist.assets) and
embeds a batch: each face is cut as dlib cuts it (facedist.face_chip, 150x150, padding 0.25), the
chips run through the network in batches, and each 128-d output is L2-normalised, so the cosine
of two embeddings is their dot product. Unnormalised, the network's outputs are what dlib's
compute_face_descriptor gives (dlib's float model; face-api's weights are uint8-quantised).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from facedist import assets
from facedist.face_chip import CHIP_PADDING, CHIP_SIZE, face_chips

MODEL_NAME = "dlib_resnet_descriptor"
MANIFEST = "faceapi/face_recognition_model-weights_manifest.json"
WEIGHTS = "faceapi/face_recognition_model.bin"
EMBEDDING_DIM = 128


def resolve_weights() -> tuple:
    """(manifest, .bin) paths; the manifest names its .bin relative to itself, so both must
    resolve to one folder."""
    manifest, weights = assets.resolve(MANIFEST), assets.resolve(WEIGHTS)
    if manifest.parent != weights.parent or manifest.parent / weights.name != weights:
        raise assets.ModelNotFoundError(
            f"{MANIFEST} resolved to {manifest} but {WEIGHTS} to {weights}: put both in one "
            f"folder ({assets.MODEL_DIR_ENV}/faceapi or the cache's faceapi)")
    return manifest, weights


class FaceDescriptor:
    """dlib's face descriptor, loaded once: embed(images, landmarks68) -> (N, 128) unit vectors."""

    name = MODEL_NAME

    def __init__(self, device: str = "cpu", batch_size: int | None = None):
        import torch

        from facedist.models.face_descriptor import fuse_for_inference
        from facedist.models.registry import create_model

        self.device = torch.device(device)
        manifest, weights = resolve_weights()
        self.model = create_model(MODEL_NAME, manifest=manifest, device=self.device)  # loaded strictly
        self.infer_model = fuse_for_inference(self.model)  # affines folded, channels-last: what runs
        # Chips per forward: small on CPU (activations stay in cache), large on a GPU.
        self.batch_size = batch_size or (16 if self.device.type == "cpu" else 256)
        self.version = f"{MODEL_NAME}:{assets.sha256_of(weights)[:12]}:chip{CHIP_SIZE}p{CHIP_PADDING}"

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """(N, 150, 150, 3) uint8 RGB chips -> (N, 128) float32, L2-normalised."""
        import torch

        from facedist.models.layers import full_precision

        chips = np.asarray(chips)
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"expected (N, {CHIP_SIZE}, {CHIP_SIZE}, 3) chips, got {chips.shape}")
        out = np.zeros((len(chips), EMBEDDING_DIM), np.float32)
        with torch.inference_mode(), full_precision():  # the same embeddings on a GPU (no TF32)
            for start in range(0, len(chips), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(chips[start:start + self.batch_size]))
                x = batch.to(self.device).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
                y = torch.nn.functional.normalize(self.infer_model(x), dim=1)
                out[start:start + len(batch)] = y.cpu().numpy()
        return out

    def embed(self, images: Sequence[np.ndarray], landmarks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images and each face's (68, 2) landmarks -> (N, 128) float32, L2-normalised."""
        if len(images) == 0:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        points = np.stack([np.asarray(p, np.float64) for p in landmarks])
        return self.embed_chips(face_chips(images, points, CHIP_SIZE, CHIP_PADDING))
