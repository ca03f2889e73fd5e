"""C-Net's weak supervision: sets of one person's images, no identity labels.

For a set S of images of one person and each j in S, the identity aggregated by C-Net from the
*other* images, with image j's own expression and camera, must reproduce j's detected landmarks:
    L_loo = mean_j |P_j( X(agg_{S \\ j}(id_coeffs, c), β_j) ) - y_j|^2 / iod_j^2
On its own this term hardly separates C-Net from the plain mean on real faces, and lets a wide
MLP on a few hundred images overfit (extreme confidences that hurt identity), so two more terms:
  - identity consistency (``consistency_ratio``): split each set into two disjoint halves; the
    two C-Net aggregates of one person must be closer to each other than to other people's
    (squared distance ratio relative to the plain mean's ratio). Distances are measured after
    within-set whitening (the metric the identity classifier sees, features.Standardizer): per-dim
    standardised distances are dominated by the directions in which one person's images vary
    anyway. It needs only "these images are the same person", and is what makes the aggregate
    better for identity.
  - shrinkage: var(log c) pulls confidences toward equal weights (the plain mean) and
    (mean log c)^2 pins their overall scale (the aggregate is invariant to it).
All terms are ratios to the plain mean's value on the same batch, so < 1 beats the mean.
benchmarks/cnet_identity_proxy.py measures the effect on identity (nearest class mean).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from facedist.models.cnet import aggregate_identity
from facedist.features import within_class_whitening
from facedist.training.data import CoefficientData
from facedist.training.geometry import KeypointBasis, fit_affine_cameras, interocular, project


@dataclass
class CNetSets:
    """Per-image tensors for C-Net training; group holds a person id per image (int)."""

    id_coeffs: torch.Tensor  # (N, D)
    exp_coeffs: torch.Tensor # (N, E)
    quality: torch.Tensor    # (N, Q) standardised
    cameras: torch.Tensor    # (N, 4, 2)
    detected: torch.Tensor   # (N, 68, 2)
    iod: torch.Tensor        # (N,)
    group: np.ndarray        # (N,) int
    metric: torch.Tensor     # (D, D) within-set whitening of id_coeffs (identity distances)
    true_id_coeffs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.group)

    def groups(self) -> np.ndarray:
        return np.unique(self.group)

    def to(self, device: str | torch.device) -> "CNetSets":
        """The same sets with every tensor on ``device``."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: value.to(device) for name, value in tensors.items()
                                if isinstance(value, torch.Tensor)})


def prepare_sets(data: CoefficientData, basis: KeypointBasis, quality_norm, *,
                 true_id_coeffs: np.ndarray | None = None) -> CNetSets:
    """Cameras come from each image's own coefficients fitted to its reprojected landmarks
    (``landmarks_fit``; detected ones where the fit is missing). Images without detected
    landmarks cannot supervise and are dropped."""
    keep = np.isfinite(data.landmarks).all(axis=(1, 2))
    own = basis.points(data.id_coeffs[keep], data.exp_coeffs[keep])
    target = np.where(np.isfinite(data.landmarks_fit[keep]).all(axis=(1, 2))[:, None, None],
                      data.landmarks_fit[keep], data.landmarks[keep])
    cameras, _ = fit_affine_cameras(own, target)
    detected = data.landmarks[keep]
    _, group = np.unique(data.subject[keep].astype(str), return_inverse=True)
    id_coeffs = data.id_coeffs[keep]
    metric = within_class_whitening(id_coeffs, group) if len(id_coeffs) else np.eye(id_coeffs.shape[1], dtype=np.float32)
    return CNetSets(
        id_coeffs=torch.as_tensor(id_coeffs), exp_coeffs=torch.as_tensor(data.exp_coeffs[keep]),
        quality=torch.as_tensor(quality_norm(data.quality[keep])), cameras=torch.as_tensor(cameras),
        detected=torch.as_tensor(detected), iod=torch.as_tensor(np.maximum(interocular(detected), 1.0)),
        group=group, metric=torch.as_tensor(metric),
        true_id_coeffs=None if true_id_coeffs is None else torch.as_tensor(true_id_coeffs[keep]))


def sample_sets(sets: CNetSets, groups: np.ndarray, set_size: int, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random set per group: (index (B, S), mask (B, S)); small groups are padded+masked."""
    index = np.zeros((len(groups), set_size), np.int64)
    mask = np.zeros((len(groups), set_size), bool)
    for row, g in enumerate(groups):
        members = np.flatnonzero(sets.group == g)
        chosen = rng.choice(members, min(set_size, len(members)), replace=False)
        index[row, : len(chosen)] = chosen
        index[row, len(chosen):] = chosen[0]
        mask[row, : len(chosen)] = True
    device = sets.id_coeffs.device  # where the sets live (the training device)
    return torch.as_tensor(index, device=device), torch.as_tensor(mask, device=device)


def leave_one_out(id_coeffs: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """agg_{S \\ j} for every j: (B, S, D) from id_coeffs, weight (B, S, D), mask (B, S)."""
    weight = weight * mask.unsqueeze(-1)
    total = (weight * id_coeffs).sum(1, keepdim=True)
    norm = weight.sum(1, keepdim=True)
    return (total - weight * id_coeffs) / (norm - weight).clamp_min(1e-8)


def loo_landmark_error(sets: CNetSets, basis_t, index: torch.Tensor, mask: torch.Tensor,
                       confidence: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image leave-one-out mean squared landmark error / iod^2, (B, S), and which count."""
    id_coeffs = sets.id_coeffs[index]
    weight = torch.ones_like(id_coeffs) if confidence is None else confidence
    loo = leave_one_out(id_coeffs, weight, mask)
    points = basis_t(loo, sets.exp_coeffs[index])
    predicted = project(points, sets.cameras[index])
    # Squared error: detector noise then adds a constant instead of drowning the gradient.
    error = (predicted - sets.detected[index]).pow(2).sum(-1).mean(-1) / sets.iod[index] ** 2
    valid = mask & (mask.sum(1, keepdim=True) > 1)
    return error, valid


@dataclass(frozen=True)
class CNetLossConfig:
    scale_weight: float = 0.1       # (mean log c)^2: pins the overall scale (the aggregate ignores it)
    spread_weight: float = 0.1      # var(log c): shrinks confidences toward equal (the plain mean)
    consistency_weight: float = 1.0  # half-set identity consistency (see consistency_ratio)


def consistency_ratio(id_coeffs: torch.Tensor, confidence: torch.Tensor, mask: torch.Tensor,
                      metric: torch.Tensor) -> torch.Tensor:
    """Split every set into two disjoint halves (its even / odd members), aggregate each half and
    return mean squared distance between the halves of the same set divided by the mean over
    halves of different sets (distances after ``metric``, (D, D)). Uses only set membership."""
    half = torch.zeros_like(mask)
    half[:, 1::2] = True   # sample_sets draws members in random order, so this is a random split
    a = aggregate_identity(id_coeffs, confidence, mask & ~half) @ metric
    b = aggregate_identity(id_coeffs, confidence, mask & half) @ metric
    ok = (mask & ~half).any(1) & (mask & half).any(1)   # sets of one image have no halves
    a, b = a[ok], b[ok]
    dist = torch.cdist(a, b).pow(2)
    same = dist.diagonal().mean()
    n = len(a)
    other = (dist.sum() - dist.diagonal().sum()) / max(n * (n - 1), 1)
    return same / other.clamp_min(1e-12)


def cnet_loss(cnet, sets: CNetSets, basis_t, index, mask, config: CNetLossConfig = CNetLossConfig()):
    """(loss, LOO error relative to the plain mean's on the same sets) for one batch.

    The data term is divided by the plain mean's error on the same batch (no gradient), so it is
    ~1 whatever the units and the regularisers keep a fixed relative strength; < 1 beats the mean."""
    confidence = cnet(sets.quality[index])
    error, valid = loo_landmark_error(sets, basis_t, index, mask, confidence)
    with torch.no_grad():
        baseline, _ = loo_landmark_error(sets, basis_t, index, mask, None)
        baseline = (baseline * valid).sum().clamp_min(1e-12)
    data_term = (error * valid).sum() / baseline
    log_c = torch.log(confidence)[mask]
    loss = data_term + config.scale_weight * log_c.mean() ** 2 + config.spread_weight * log_c.var()
    if config.consistency_weight:
        id_coeffs = sets.id_coeffs[index]
        with torch.no_grad():
            base = consistency_ratio(id_coeffs, torch.ones_like(id_coeffs), mask, sets.metric)
        loss = loss + config.consistency_weight * consistency_ratio(id_coeffs, confidence, mask, sets.metric) / base
    return loss, data_term.detach()


@torch.no_grad()
def evaluate_sets(cnet, sets: CNetSets, basis_t, *, set_size: int = 3, repeats: int = 4,
                  groups: np.ndarray | None = None, seed: int = 0) -> dict:
    """Sums (for all-reduce) of LOO landmark error and, with truth, identity error to truth
    (in prior-std units when given), for C-Net weighting vs the plain mean on the same sets."""
    cnet.eval()
    rng = np.random.default_rng(seed)
    groups = sets.groups() if groups is None else groups
    sums = {"loo_cnet": 0.0, "loo_mean": 0.0, "loo_count": 0.0,
            "truth_cnet": 0.0, "truth_mean": 0.0, "truth_count": 0.0}
    for _ in range(repeats):
        index, mask = sample_sets(sets, groups, set_size, rng)
        confidence = cnet(sets.quality[index])
        for name, conf in (("cnet", confidence), ("mean", None)):
            error, valid = loo_landmark_error(sets, basis_t, index, mask, conf)
            sums[f"loo_{name}"] += float((error * valid).sum())
            if sets.true_id_coeffs is not None:
                agg = aggregate_identity(sets.id_coeffs[index], conf, mask)
                truth = sets.true_id_coeffs[index[:, 0]]
                sums[f"truth_{name}"] += float((agg - truth).norm(dim=-1).sum())
        sums["loo_count"] += float(valid.sum())
        sums["truth_count"] += float(len(groups)) if sets.true_id_coeffs is not None else 0.0
    return sums


def summarize_sets_eval(sums: dict) -> dict:
    # RMS landmark error / iod.
    out = {"loo_error_cnet": (sums["loo_cnet"] / max(sums["loo_count"], 1)) ** 0.5,
           "loo_error_mean": (sums["loo_mean"] / max(sums["loo_count"], 1)) ** 0.5}
    if sums.get("truth_count"):
        out["truth_error_cnet"] = sums["truth_cnet"] / sums["truth_count"]
        out["truth_error_mean"] = sums["truth_mean"] / sums["truth_count"]
    return out
