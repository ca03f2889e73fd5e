"""ResNets in torchvision's layout and Deep3DFaceRecon's R-Net with its checkpoint format."""

from __future__ import annotations

import pytest
import torch

from facedist.models.resnet import (RECON_OUTPUT_DIM, ReconNet, load_recon_net, resnet34, resnet50,
                                    split_coefficients)
from facedist.schema import DEEP3D_SPLITS


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_torchvision():
    # torchvision's published sizes: resnet34 21,797,672 and resnet50 25,557,032 parameters
    assert _n_params(resnet34()) == 21_797_672
    assert _n_params(resnet50()) == 25_557_032


def test_torchvision_key_layout():
    keys = set(resnet50().state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "layer1.0.conv3.weight",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
                "layer4.2.bn3.bias", "fc.weight", "fc.bias"):
        assert key in keys, key
    assert "layer1.0.conv3.weight" not in resnet34().state_dict()
    assert "layer2.0.downsample.1.weight" in resnet34().state_dict()
    assert len(keys) == 320  # torchvision resnet50 state_dict has 320 entries


def test_resnet34_custom_classes_and_channels():
    model = resnet34(num_classes=7, in_channels=1).eval()
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 7)


def test_recon_net_keys_are_deep3d_net_recon_keys():
    net = ReconNet()
    keys = list(net.state_dict())
    backbone = {f"backbone.{k}" for k in resnet50().state_dict() if not k.startswith("fc.")}
    heads = {f"final_layers.{i}.{p}" for i in range(7) for p in ("weight", "bias")}
    assert set(keys) == backbone | heads
    assert not any(k.startswith("backbone.fc") for k in keys)
    sizes = [net.state_dict()[f"final_layers.{i}.weight"].shape for i in range(7)]
    assert sizes == [(n, 2048, 1, 1) for n in (80, 64, 80, 3, 27, 2, 1)]


def test_recon_net_starts_at_zero_and_outputs_257():
    net = ReconNet().eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = net(x)
        pooled = net.backbone(x)
    assert out.shape == (2, RECON_OUTPUT_DIM) == (2, 257)
    assert torch.count_nonzero(out) == 0  # heads are zero-initialised as upstream
    assert pooled.shape == (2, 2048, 1, 1)  # use_last_fc=False backbone output


def _randomise_heads(net: ReconNet, seed: int = 0) -> ReconNet:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.final_layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
    return net


def test_checkpoint_loads_strict_and_reproduces_outputs(tmp_path):
    net = _randomise_heads(ReconNet()).eval()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    path = tmp_path / "epoch_20.pth"
    torch.save({"net_recon": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 20}, path)

    loaded = load_recon_net(path)
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        expected = net(x)
        got, feature = loaded.forward_with_features(x)
    assert not loaded.training
    assert torch.count_nonzero(expected) > 0
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(feature, net.forward_features(x))
    torch.testing.assert_close(loaded(x), got)


def test_checkpoint_loading_is_strict(tmp_path):
    state = ReconNet().state_dict()
    missing = {k: v for k, v in state.items() if k != "final_layers.6.bias"}
    torch.save({"net_recon": missing}, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="final_layers.6.bias"):
        load_recon_net(tmp_path / "missing.pth")

    extra = dict(state, **{"backbone.fc.weight": torch.zeros(2048, 2048)})
    torch.save({"net_recon": extra}, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="backbone.fc.weight"):
        load_recon_net(tmp_path / "extra.pth")

    torch.save({"model": state}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="net_recon"):
        load_recon_net(tmp_path / "other.pth")


def test_split_coefficients_order():
    out = torch.arange(2 * 257, dtype=torch.float32).reshape(2, 257)
    parts = split_coefficients(out)
    assert list(parts) == [name for name, _ in DEEP3D_SPLITS] == ["id", "exp", "tex", "angle", "gamma", "trans"]
    assert [parts[n].shape[1] for n in parts] == [80, 64, 80, 3, 27, 3]
    assert parts["id"][0, 0] == 0 and parts["exp"][0, 0] == 80 and parts["tex"][0, 0] == 144
    assert parts["angle"][0, 0] == 224 and parts["gamma"][0, 0] == 227 and parts["trans"][1, -1] == 513
    with pytest.raises(ValueError):
        split_coefficients(torch.zeros(1, 62))


def test_translation_heads_are_tx_ty_then_tz():
    net = ReconNet().eval()
    with torch.no_grad():
        net.final_layers[5].bias.copy_(torch.tensor([1.0, 2.0]))
        net.final_layers[6].bias.copy_(torch.tensor([3.0]))
        trans = split_coefficients(net(torch.rand(1, 3, 224, 224)))["trans"]
    torch.testing.assert_close(trans, torch.tensor([[1.0, 2.0, 3.0]]))
