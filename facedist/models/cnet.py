"""C-Net: per-image, per-dimension confidences for aggregating identity coefficients.

Each image of a person gets a positive confidence c_i (one per identity dimension) from what the
extractor knows about how trustworthy that image is: the regressor's pooled feature, the head pose,
the detection score and the landmark residual. The person's identity is the confidence-weighted
mean  α = sum_i c_i * α_i / sum_i c_i  (``aggregate_identity``).

Trained weakly supervised (facedist.training.cnet): no identity labels, only sets of images of the
same person: leave-one-out landmark reprojection plus half-set identity consistency, with the
confidences shrunk toward equal weights.

By default one confidence per image, shared by its identity dims (``per_dimension=False``); the
paper's per-dimension c_i is ``per_dimension=True``. The classifiers whiten their inputs within
class, and per-dimension weights that differ between images change the within-person covariance
that whitening was fitted on; one weight per image leaves that covariance's directions alone.
benchmarks/cnet_identity_proxy.py compares the two (docs/results.md has the figures).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class CNetConfig:
    input_dim: int        # length of the per-image quality vector (see training.data.cnet_inputs)
    n_id: int             # number of identity coefficients to weight
    hidden: int = 128
    dropout: float = 0.1
    min_confidence: float = 1e-3  # floor, so no image's weight is exactly zero
    per_dimension: bool = False   # True: one confidence per identity dim (the paper's c_i ⊙ α_i)

    def to_dict(self) -> dict:
        return asdict(self)


class CNet(nn.Module):
    def __init__(self, config: CNetConfig):
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden), nn.LayerNorm(config.hidden), nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden), nn.GELU(),
            nn.Linear(config.hidden, config.n_id if config.per_dimension else 1),
        )
        # Start at equal confidences (softplus(0.5413) = 1): an untrained C-Net is the plain mean.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.constant_(self.mlp[-1].bias, 0.5413)

    def forward(self, quality: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., n_id) positive confidences."""
        confidence = F.softplus(self.mlp(quality)) + self.config.min_confidence
        return confidence if self.config.per_dimension else confidence.expand(*confidence.shape[:-1], self.config.n_id)


def aggregate_identity(id_coeffs: torch.Tensor, confidence: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Confidence-weighted mean over the image axis.

    id_coeffs: (..., N, D) identity coefficients of N images; confidence: (..., N, D) or None (plain
    mean); mask: (..., N) bool/0-1, which images take part (None: all). Returns (..., D)."""
    weight = torch.ones_like(id_coeffs) if confidence is None else confidence
    if mask is not None:
        weight = weight * mask.unsqueeze(-1).to(weight.dtype)
    return (weight * id_coeffs).sum(-2) / weight.sum(-2).clamp_min(1e-8)


def confidence_weights(confidence: np.ndarray, width: int) -> np.ndarray:
    """C-Net's (..., n_id) confidences as weights for a descriptor of ``width``: as they are when
    it is the identity coefficients alone, else each image's mean confidence on every dimension
    (one weight per image covers any group it is given)."""
    confidence = np.asarray(confidence)
    if confidence.shape[-1] == width:
        return confidence
    return np.repeat(confidence.mean(-1, keepdims=True), width, -1)


def cnet(**config) -> CNet:
    """create_model("cnet", input_dim=..., n_id=..., ...): CNetConfig's fields as keywords."""
    return CNet(CNetConfig(**config))


def build_cnet(config: dict | CNetConfig) -> CNet:
    if isinstance(config, dict):
        config = CNetConfig(**config)
    return CNet(config)
