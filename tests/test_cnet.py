import numpy as np
import torch

from facedist.models.cnet import CNet, CNetConfig, aggregate_identity
from facedist.training.cnet import consistency_ratio, leave_one_out
from facedist.training.geometry import KeypointBasis, camera_from_pose, fit_affine_cameras, homogeneous


def test_aggregate_is_weighted_mean_and_respects_mask():
    id_coeffs = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [100.0, 100.0]]])
    conf = torch.tensor([[[1.0, 3.0], [1.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0]])
    agg = aggregate_identity(id_coeffs, conf, mask)
    assert torch.allclose(agg, torch.tensor([[2.0, 12.5]]))
    assert torch.allclose(aggregate_identity(id_coeffs[:, :2]), torch.tensor([[2.0, 15.0]]))


def test_untrained_cnet_is_the_plain_mean_and_positive():
    net = CNet(CNetConfig(input_dim=7, n_id=40)).eval()
    c = net(torch.randn(4, 3, 7) * 10)
    assert c.shape == (4, 3, 40) and (c > 0).all()
    id_coeffs = torch.randn(4, 3, 40)
    assert torch.allclose(aggregate_identity(id_coeffs, c), id_coeffs.mean(1), atol=1e-5)


def test_leave_one_out_matches_explicit_loop():
    id_coeffs, weight = torch.randn(2, 4, 5), torch.rand(2, 4, 5) + 0.1
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    loo = leave_one_out(id_coeffs, weight, mask)
    for b in range(2):
        for j in range(int(mask[b].sum())):
            keep = [i for i in range(4) if i != j and mask[b, i]]
            expect = (weight[b, keep] * id_coeffs[b, keep]).sum(0) / weight[b, keep].sum(0)
            assert torch.allclose(loo[b, j], expect, atol=1e-5)


def test_affine_camera_recovery_on_the_real_basis():
    basis = KeypointBasis.tddfa()
    rng = np.random.default_rng(0)
    points = basis.points(rng.normal(0, 1e5, (3, 40)).astype(np.float32) * 0.1, np.zeros((3, 10), np.float32))
    cams = np.stack([camera_from_pose(y, 4.0, -3.0, 7e-4, 150, 110) for y in (-40, 0, 35)])
    pixels = np.einsum("nki,nij->nkj", homogeneous(points.astype(np.float64)), cams)
    fitted, residual = fit_affine_cameras(points, pixels)
    assert residual.max() < 1e-3
    assert np.allclose(fitted, cams, atol=1e-4)


def test_consistency_ratio_rewards_downweighting_outlier_images():
    torch.manual_seed(0)
    people, size, dims = 8, 6, 5
    identity = torch.randn(people, 1, dims) * 3
    noise = torch.randn(people, size, dims) * 0.3
    outlier = torch.zeros(people, size, 1, dtype=torch.bool)
    outlier[:, :2] = True                       # one outlier in each half (members 0 and 1)
    id_coeffs = identity + noise + outlier * torch.randn(people, size, dims) * 5
    mask = torch.ones(people, size, dtype=torch.bool)
    metric = torch.eye(dims)
    uniform = consistency_ratio(id_coeffs, torch.ones_like(id_coeffs), mask, metric)
    trusted = consistency_ratio(id_coeffs, torch.where(outlier, 0.01, 1.0).expand_as(id_coeffs), mask, metric)
    assert trusted < 0.5 * uniform


def test_shared_confidence_option_is_one_weight_per_image():
    net = CNet(CNetConfig(input_dim=7, n_id=40, per_dimension=False))
    c = net(torch.randn(4, 3, 7))
    assert c.shape == (4, 3, 40) and torch.equal(c, c[..., :1].expand_as(c))


def test_sets_and_sampled_indices_follow_the_training_device():
    """What broke C-Net on CUDA: sets, indices and masks must live where the model trains."""
    from facedist.training.cnet import CNetSets, sample_sets

    n = 6
    sets = CNetSets(id_coeffs=torch.zeros(n, 4), exp_coeffs=torch.zeros(n, 2), quality=torch.zeros(n, 3),
                    cameras=torch.zeros(n, 4, 2), detected=torch.zeros(n, 68, 2), iod=torch.ones(n),
                    group=np.array([0, 0, 0, 1, 1, 1]), metric=torch.eye(4))
    moved = sets.to("meta")  # a device other than the CPU, available everywhere
    tensors = [moved.id_coeffs, moved.exp_coeffs, moved.quality, moved.cameras, moved.detected, moved.iod, moved.metric]
    assert all(t.device.type == "meta" for t in tensors) and moved.true_id_coeffs is None
    assert moved.group is sets.group and sets.id_coeffs.device.type == "cpu"
    index, mask = sample_sets(moved, moved.groups(), 3, np.random.default_rng(0))
    assert index.device.type == "meta" and mask.device.type == "meta" and index.shape == (2, 3)
