"""1-D ResNets over coefficient vectors (Li, Dong & Lui 2025).

A coefficient vector (B, D) is read as a one-channel signal of length D, so neighbouring basis
dimensions (ordered by explained variance) share filters the way pixels do in a 2-D ResNet.

- ``resnet34_1d``: torchvision's ResNet-34 layout (3, 4, 6, 3 basic blocks; 64..512 channels), with
  a stride-1 stem and no max-pool because D is only 40..80 long. Identity and gender.
- ``resnet32_1d``: the CIFAR ResNet-32 layout (3 stages x 5 basic blocks; 16, 32, 64 channels).
  Expression.

Parameter names follow torchvision (conv1/bn1/layerN.M.convK/bnK/downsample.0/1, fc), so weights
load strictly and read like the 2-D models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


class BasicBlock1d(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv1d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm1d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


@dataclass(frozen=True)
class ResNet1dConfig:
    """Everything needed to rebuild the network (stored in model bundles)."""

    arch: str            # "resnet34_1d" | "resnet32_1d"
    input_dim: int       # length of the coefficient vector
    num_classes: int
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


ARCHS = {
    # name: (blocks per stage, channels per stage, stem channels)
    "resnet34_1d": ((3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet32_1d": ((5, 5, 5), (16, 32, 64), 16),
}


class ResNet1d(nn.Module):
    def __init__(self, config: ResNet1dConfig):
        super().__init__()
        if config.arch not in ARCHS:
            raise ValueError(f"unknown arch {config.arch!r}; choose one of {sorted(ARCHS)}")
        self.config = config
        blocks, channels, stem = ARCHS[config.arch]
        self.conv1 = nn.Conv1d(1, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(stem)
        self.relu = nn.ReLU(inplace=True)
        in_planes = stem
        for index, (n_blocks, planes) in enumerate(zip(blocks, channels)):
            stride = 1 if index == 0 else 2
            layer = []
            for b in range(n_blocks):
                layer.append(BasicBlock1d(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_planes, config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Zero-init the last BN of each block: every block starts as the identity (trains faster).
        for module in self.modules():
            if isinstance(module, BasicBlock1d):
                nn.init.zeros_(module.bn2.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) coefficients -> (B, C) pooled features."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


def resnet34_1d(input_dim: int, num_classes: int, dropout: float = 0.0) -> ResNet1d:
    return ResNet1d(ResNet1dConfig("resnet34_1d", input_dim, num_classes, dropout))


def resnet32_1d(input_dim: int, num_classes: int, dropout: float = 0.0) -> ResNet1d:
    return ResNet1d(ResNet1dConfig("resnet32_1d", input_dim, num_classes, dropout))


def build_resnet1d(config: dict | ResNet1dConfig) -> ResNet1d:
    if isinstance(config, dict):
        config = ResNet1dConfig(**config)
    return ResNet1d(config)
