"""dlib's ResNet face descriptor (dlib_face_recognition_resnet_model_v1) in plain torch.

The network maps a 150x150 RGB face chip (facedist.face_chip: dlib's alignment) to 128 numbers;
faces of one person lie close together. It is dlib's metric-learning ResNet (dnn_face_recognition_ex
upstream): a 7x7 stride-2 conv and a 3x3 max-pool, then 14 residual blocks of two 3x3 convs
(32, 64, 128, 256 channels; the first block of each width halves the resolution), 29 convs in
all, a global average and a 128 x 256 linear map without bias.

The weights are face-api's port (face_recognition_model, justadudewhohacks/face-api.js
src/faceRecognitionNet, uint8-quantised TF.js), and the module names are face-api's, so its
manifest loads strictly. Its quirks, kept because they are dlib's:
  * each conv has a bias and is followed by a per-channel affine ("scale": dlib's affine layer,
    its batch norm frozen), then ReLU except before a residual sum;
  * stride-2 convs and pools have no padding; a downsampling block's shortcut is a 2x2 average
    pool, zero-padded in channels, and the block's own output is zero-padded at the bottom and
    right when its map is smaller (dlib's add_prev sums tensors of different sizes that way);
  * the input is RGB minus the mean (122.782, 117.001, 104.298), divided by 256.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 150
EMBEDDING_DIM = 128
RGB_MEAN = (122.782, 117.001, 104.298)
INPUT_SCALE = 256.0


class Affine(nn.Module):
    """Per-channel y = x * weight + bias (dlib's affine layer; face-api's "scale")."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class ConvAffine(nn.Module):
    """Conv (with bias) + Affine; stride 2 convs are unpadded, stride 1 ones keep the size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        padding = 0 if stride > 1 else kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.scale = Affine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.conv(x))


class ResidualBlock(nn.Module):
    """relu(x + conv2(relu(conv1(x)))), 3x3 convs, same size and width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvAffine(channels, channels)
        self.conv2 = ConvAffine(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class ResidualDownBlock(nn.Module):
    """Half the resolution: conv1 has stride 2 (unpadded); the shortcut is a 2x2 average pool,
    zero-padded to the block's width, and the residual is zero-padded to the pool's size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvAffine(in_channels, out_channels, stride=2)
        self.conv2 = ConvAffine(out_channels, out_channels)
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2)
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        pad_h, pad_w = shortcut.shape[2] - out.shape[2], shortcut.shape[3] - out.shape[3]
        if pad_h or pad_w:
            out = F.pad(out, (0, pad_w, 0, pad_h))
        return F.relu(out + shortcut)


class DlibResNetDescriptor(nn.Module):
    """(N, 3, 150, 150) RGB chips in 0..255 -> (N, 128) descriptors (not normalised)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rgb_mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv32_down = ConvAffine(3, 32, kernel_size=7, stride=2)
        self.conv32_1 = ResidualBlock(32)
        self.conv32_2 = ResidualBlock(32)
        self.conv32_3 = ResidualBlock(32)
        self.conv64_down = ResidualDownBlock(32, 64)
        self.conv64_1 = ResidualBlock(64)
        self.conv64_2 = ResidualBlock(64)
        self.conv64_3 = ResidualBlock(64)
        self.conv128_down = ResidualDownBlock(64, 128)
        self.conv128_1 = ResidualBlock(128)
        self.conv128_2 = ResidualBlock(128)
        self.conv256_down = ResidualDownBlock(128, 256)
        self.conv256_1 = ResidualBlock(256)
        self.conv256_2 = ResidualBlock(256)
        self.conv256_down_out = ResidualDownBlock(256, 256)
        self.fc = nn.Linear(256, EMBEDDING_DIM, bias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 256) globally averaged features."""
        x = (x - self.rgb_mean) / INPUT_SCALE
        x = F.max_pool2d(F.relu(self.conv32_down(x)), 3, 2)
        for block in (self.conv32_1, self.conv32_2, self.conv32_3,
                      self.conv64_down, self.conv64_1, self.conv64_2, self.conv64_3,
                      self.conv128_down, self.conv128_1, self.conv128_2,
                      self.conv256_down, self.conv256_1, self.conv256_2, self.conv256_down_out):
            x = block(x)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def state_dict_from_tfjs(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """face-api's tensors (facedist.models.tfjs.load_tfjs_weights) under this module's names:
    "a/conv1/conv/filters" (HWIO) -> "a.conv1.conv.weight" (OIHW), "scale/weights" -> "scale.weight",
    "scale/biases" -> "scale.bias", "fc" (in x out) -> "fc.weight" (out x in)."""
    renames = {"filters": "weight", "weights": "weight", "biases": "bias", "bias": "bias"}
    state = {}
    for name, value in weights.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value, np.float32))
        if name == "fc":
            state["fc.weight"] = tensor.t().contiguous()
            continue
        *path, leaf = name.split("/")
        if leaf not in renames:
            raise KeyError(f"unexpected tensor {name!r} in the face descriptor's weights")
        if leaf == "filters":
            tensor = tensor.permute(3, 2, 0, 1).contiguous()
        state[".".join([*path, renames[leaf]])] = tensor
    return state


def load_dlib_resnet_descriptor(manifest: str | Path, device: str | torch.device = "cpu") -> DlibResNetDescriptor:
    """The network with face-api's weights (a TF.js manifest beside its .bin), loaded strictly,
    in eval mode."""
    from facedist.models.tfjs import load_tfjs_weights

    model = DlibResNetDescriptor()
    model.load_state_dict(state_dict_from_tfjs(load_tfjs_weights(manifest)), strict=True)
    return model.to(device).eval()


def dlib_resnet_descriptor(manifest: str | Path | None = None, **kwargs) -> DlibResNetDescriptor:
    """Registry entry: the bare network, or with face-api's weights when given its manifest."""
    if manifest is not None:
        return load_dlib_resnet_descriptor(manifest, **kwargs)
    return DlibResNetDescriptor(**kwargs)


def fold_affine(block: ConvAffine) -> nn.Conv2d:
    """The conv with its affine folded in (w * s, b * s + t): one pass over each activation fewer."""
    conv, scale = block.conv, block.scale
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.weight.view(-1, 1, 1, 1))
        fused.bias.copy_(conv.bias * scale.weight + scale.bias)
    return fused


def fuse_for_inference(model: DlibResNetDescriptor) -> DlibResNetDescriptor:
    """A copy for inference: affines folded into their convs, channels-last memory (faster
    convolutions on CPU). The loaded model stays as it is, with face-api's names."""
    import copy

    fused = copy.deepcopy(model)
    for name, module in list(fused.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ConvAffine):
                setattr(module, child_name, fold_affine(child))
    return fused.to(memory_format=torch.channels_last).eval()
