import pytest
import torch

from facedist.models.resnet1d import ResNet1dConfig, build_resnet1d, resnet32_1d, resnet34_1d


def test_resnet34_1d_layout_and_shapes():
    model = resnet34_1d(input_dim=40, num_classes=15).eval()
    blocks = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert blocks == [3, 4, 6, 3]
    assert model(torch.randn(5, 40)).shape == (5, 15)
    # torchvision-style names, so checkpoints read like the 2-D models'.
    keys = model.state_dict().keys()
    assert "layer2.0.downsample.0.weight" in keys and "fc.weight" in keys and "conv1.weight" in keys


def test_resnet32_1d_is_cifar_style():
    model = resnet32_1d(input_dim=10, num_classes=6).eval()
    assert model.num_stages == 3
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 4)] == [5, 5, 5]
    convs = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv1d) and m.kernel_size == (3,))
    assert convs + 1 == 32  # 31 3-tap convs + the classifier = 32 weighted layers
    assert model(torch.randn(3, 10)).shape == (3, 6)


@pytest.mark.slow  # trains a 1-D ResNet-34
def test_strict_roundtrip_and_learns():
    torch.manual_seed(0)
    config = ResNet1dConfig("resnet32_1d", 12, 3)
    model = build_resnet1d(config)
    x = torch.randn(96, 12)
    y = (x[:, 0] > 0).long() + (x[:, 5] > 1).long()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    accuracy = (model(x).argmax(1) == y).float().mean()
    assert accuracy > 0.9
    clone = build_resnet1d(config.to_dict())
    clone.load_state_dict(model.state_dict(), strict=True)
    assert torch.allclose(clone.eval()(x), model(x))
    with pytest.raises(ValueError):
        build_resnet1d({"arch": "resnet99_1d", "input_dim": 4, "num_classes": 2})
