"""2-D ResNets (torchvision layout) and Deep3DFaceRecon's R-Net (ReconNetWrapper) on a ResNet-50.

Parameter names follow torchvision exactly (conv1/bn1/layer1..4/fc, blocks conv1..3/bn1..3/downsample),
so torchvision ResNet state dicts load strictly, and ReconNet's keys are exactly Deep3DFaceRecon's
`net_recon` keys (`backbone.*`, `final_layers.0..6.*`), so its `epoch_20.pth` loads strictly too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from facedist.schema import DEEP3D_SPLITS


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=bias)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as torchvision and Deep3DFaceRecon."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet. With use_last_fc=False there is no `fc` (as Deep3DFaceRecon's backbone)
    and forward returns the pooled feature as N x C x 1 x 1."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 in_channels: int = 3, use_last_fc: bool = True, zero_init_residual: bool = False):
        super().__init__()
        self.use_last_fc = use_last_fc
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = 512 * block.expansion
        if use_last_fc:
            self.fc = nn.Linear(self.feature_dim, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each residual branch starts as identity (helps small-data training)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled feature, N x C x 1 x 1."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        if self.use_last_fc:
            x = self.fc(torch.flatten(x, 1))
        return x


def resnet18(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, **kwargs)


def resnet34(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, **kwargs)


def resnet50(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, **kwargs)


# Deep3DFaceRecon's output heads, in order: id, exp, tex, angle, gamma, tx&ty, tz (= 257 outputs).
RECON_HEAD_SIZES = (80, 64, 80, 3, 27, 2, 1)
RECON_OUTPUT_DIM = sum(RECON_HEAD_SIZES)
RECON_INPUT_SIZE = 224


class ReconNet(nn.Module):
    """Deep3DFaceRecon's R-Net (networks.ReconNetWrapper, net_recon='resnet50', use_last_fc=False).

    Input: N x 3 x 224 x 224 RGB in 0..1 (no mean/std normalisation, as upstream).
    Output: N x 257 coefficients; split them with split_coefficients.
    """

    def __init__(self):
        super().__init__()
        self.backbone = resnet50(use_last_fc=False)
        dim = self.backbone.feature_dim
        self.final_layers = nn.ModuleList([conv1x1(dim, n, bias=True) for n in RECON_HEAD_SIZES])
        for m in self.final_layers:  # upstream starts the heads at zero (mean face, no pose)
            nn.init.constant_(m.weight, 0.0)
            nn.init.constant_(m.bias, 0.0)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled backbone feature, N x 2048 (the C-Net input)."""
        return torch.flatten(self.backbone(x), 1)

    def heads(self, pooled: Tensor) -> Tensor:
        """Coefficients from the pooled feature (N x 2048 or N x 2048 x 1 x 1): N x 257."""
        if pooled.dim() == 2:
            pooled = pooled[:, :, None, None]
        return torch.flatten(torch.cat([layer(pooled) for layer in self.final_layers], dim=1), 1)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(coefficients N x 257, pooled feature N x 2048) from one backbone pass."""
        pooled = self.backbone(x)
        return self.heads(pooled), torch.flatten(pooled, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.backbone(x))


def split_coefficients(out: Tensor) -> dict[str, Tensor]:
    """Split N x 257 into id (80), exp (64), tex (80), angle (3: pitch, yaw, roll in radians),
    gamma (27 SH lighting), trans (3), following facedist.schema.DEEP3D_SPLITS."""
    total = sum(n for _, n in DEEP3D_SPLITS)
    if out.shape[-1] != total:
        raise ValueError(f"expected {total} coefficients, got {out.shape[-1]}")
    parts, start = {}, 0
    for name, size in DEEP3D_SPLITS:
        parts[name] = out[..., start:start + size]
        start += size
    return parts


def _net_recon_state_dict(checkpoint: Mapping) -> Mapping[str, Tensor]:
    if "net_recon" in checkpoint:
        return checkpoint["net_recon"]
    if any(str(k).startswith("backbone.") for k in checkpoint):  # a bare net_recon state dict
        return checkpoint
    raise ValueError(f"not a Deep3DFaceRecon checkpoint: no 'net_recon' key (keys: {sorted(checkpoint)[:8]})")


def load_recon_net(path: str | Path, map_location: str | torch.device = "cpu") -> ReconNet:
    """ReconNet with weights from a Deep3DFaceRecon checkpoint ({'net_recon': state_dict, ...}),
    loaded strictly. weights_only: a user-supplied file is never unpickled as arbitrary code."""
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle with non-tensor objects (e.g. an old scheduler)
        raise ValueError(
            f"cannot load {path} as plain tensors ({exc}). Re-save its weights only, e.g. "
            f"torch.save({{'net_recon': torch.load(p, weights_only=False)['net_recon']}}, out)") from exc
    model = ReconNet()
    model.load_state_dict(_net_recon_state_dict(checkpoint), strict=True)
    return model.eval()
