"""face-api.js's expression net and age/gender net on torch, loaded strictly from its TF.js weights.

Both take the same input: a 112x112 RGB face crop, float pixel values 0..255, (N, 3, 112, 112)
(``facedist.face_attributes.faceapi_inputs`` makes it from an image and a face box). Each net
subtracts face-api's mean RGB and divides by 255 itself, as face-api's nets do, so callers hand
both nets the raw crop. (Older face-api.js sources divide by 256 in TinyXception; the released
@vladmandic/face-api 1.7.15, whose weights these are, divides by 255, and its outputs are the
reference the tests hold this port to.)

  * FaceExpressionNet: face-api's "FaceFeatureExtractor", four dense blocks of 3x3 depthwise-
    separable convolutions (32, 64, 128, 256 channels, each block halving the resolution), global
    average pooling to a 256-d feature, then fc 256 -> 7 logits in FACEAPI_EXPRESSIONS order
    (facedist.schema).
  * AgeGenderNet: face-api's TinyXception (entry flow with two reduction blocks, two residual main
    blocks, exit reduction block, separable conv to 512), global average pooling to 512-d, then an
    age regressor (years) and 2 gender logits, index 0 male and 1 female.

TF "same" padding is asymmetric for stride 2 on even sizes (all of it after: bottom and right);
``_pad_same`` reproduces it, where torch's symmetric padding would shift every strided layer by a
pixel. Weight names follow the manifests ('dense0/conv1/depthwise_filter' is
'dense0.conv1.depthwise.weight'), so loading is one rename + transpose and a strict
load_state_dict; any tensor missing, extra or of the wrong shape is an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from facedist.schema import FACEAPI_EXPRESSIONS

INPUT_SIZE = 112
MEAN_RGB = (122.782, 117.001, 104.298)  # face-api's normalize(): per-channel mean, RGB order
GENDERS = ("male", "female")  # order of the gender head's outputs

EXPRESSION_MANIFEST = "faceapi/face_expression_model-weights_manifest.json"
AGE_GENDER_MANIFEST = "faceapi/age_gender_model-weights_manifest.json"


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TF's 'same' padding: output ceil(in / stride), the odd pixel of padding after."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dim first
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class Conv2dSame(nn.Conv2d):
    """A convolution with TF 'same' padding (face-api's conv2d(..., 'same') + bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        # At stride 1 'same' is symmetric and torch pads inside the conv (no extra copy).
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(kernel_size - 1) // 2 if stride == 1 else 0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


class SeparableConv2d(nn.Module):
    """tf.separableConv2d + bias: a 3x3 depthwise conv (carrying the stride), a 1x1 pointwise conv,
    then one bias per output channel (face-api stores a single bias for the pair)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.depthwise = Conv2dSame(in_channels, in_channels, 3, stride=stride, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x)) + self.bias.view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------ expression


class DenseBlock(nn.Module):
    """face-api's denseBlock4: a strided first conv, then three separable convs, each fed the ReLU
    of the sum of all outputs so far; the block returns the ReLU of the sum of all four."""

    def __init__(self, in_channels: int, out_channels: int, first: bool = False):
        super().__init__()
        # The first block sees RGB: a plain conv there, separable everywhere else.
        self.conv0 = (Conv2dSame(in_channels, out_channels, 3, stride=2) if first
                      else SeparableConv2d(in_channels, out_channels, stride=2))
        self.conv1 = SeparableConv2d(out_channels, out_channels)
        self.conv2 = SeparableConv2d(out_channels, out_channels)
        self.conv3 = SeparableConv2d(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = F.relu(self.conv0(x))
        out2 = self.conv1(out1)
        out3 = self.conv2(F.relu(out1 + out2))
        out4 = self.conv3(F.relu(out1 + out2 + out3))
        return F.relu(out1 + out2 + out3 + out4)


class FaceExpressionNet(nn.Module):
    """face-api's FaceExpressionNet: (N, 3, 112, 112) RGB 0..255 -> (N, 7) logits (FACEAPI_EXPRESSIONS)."""

    num_features = 256

    def __init__(self):
        super().__init__()
        self.dense0 = DenseBlock(3, 32, first=True)
        self.dense1 = DenseBlock(32, 64)
        self.dense2 = DenseBlock(64, 128)
        self.dense3 = DenseBlock(128, 256)
        self.fc = nn.Linear(self.num_features, len(FACEAPI_EXPRESSIONS))
        self.register_buffer("mean_rgb", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 256-d feature the classifier reads."""
        _check_input(x)
        x = (x - self.mean_rgb) / 255.0
        x = self.dense3(self.dense2(self.dense1(self.dense0(x))))
        return x.mean(dim=(2, 3))  # face-api: avgPool 7x7 'valid' on the 7x7 map, i.e. a global mean

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------ age/gender


class ReductionBlock(nn.Module):
    """TinyXception's reduction block: two separable convs and a 3x3/2 max pool, plus a strided
    1x1 conv of the block's input as the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, activate_input: bool = True):
        super().__init__()
        self.activate_input = activate_input
        self.separable_conv0 = SeparableConv2d(in_channels, out_channels)
        self.separable_conv1 = SeparableConv2d(out_channels, out_channels)
        self.expansion_conv = Conv2dSame(in_channels, out_channels, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x) if self.activate_input else x
        out = self.separable_conv1(F.relu(self.separable_conv0(out)))
        # TF's 'same' max pool never picks the padding: pad with -inf, not 0.
        out = F.max_pool2d(_pad_same(out, 3, 2, value=float("-inf")), 3, 2)
        return out + self.expansion_conv(x)


class MainBlock(nn.Module):
    """TinyXception's residual block: three ReLU + separable conv steps added to the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.separable_conv0 = SeparableConv2d(channels, channels)
        self.separable_conv1 = SeparableConv2d(channels, channels)
        self.separable_conv2 = SeparableConv2d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.separable_conv0(F.relu(x))
        out = self.separable_conv1(F.relu(out))
        out = self.separable_conv2(F.relu(out))
        return out + x


class AgeGenderNet(nn.Module):
    """face-api's AgeGenderNet: (N, 3, 112, 112) RGB 0..255 -> age in years (N,) and gender logits
    (N, 2) in GENDERS order."""

    num_features = 512

    def __init__(self, num_main_blocks: int = 2):
        super().__init__()
        self.entry_flow = nn.ModuleDict({
            "conv_in": Conv2dSame(3, 32, 3, stride=2),
            "reduction_block_0": ReductionBlock(32, 64, activate_input=False),
            "reduction_block_1": ReductionBlock(64, 128),
        })
        self.middle_flow = nn.ModuleDict({f"main_block_{i}": MainBlock(128) for i in range(num_main_blocks)})
        self.exit_flow = nn.ModuleDict({
            "reduction_block": ReductionBlock(128, 256),
            "separable_conv": SeparableConv2d(256, self.num_features),
        })
        self.fc = nn.ModuleDict({"age": nn.Linear(self.num_features, 1),
                                 "gender": nn.Linear(self.num_features, len(GENDERS))})
        self.register_buffer("mean_rgb", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 512-d feature both heads read."""
        _check_input(x)
        x = (x - self.mean_rgb) / 255.0
        entry = self.entry_flow
        x = F.relu(entry["conv_in"](x))
        x = entry["reduction_block_1"](entry["reduction_block_0"](x))
        for block in self.middle_flow.values():
            x = block(x)
        x = F.relu(self.exit_flow["separable_conv"](self.exit_flow["reduction_block"](x)))
        return x.mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc["age"](features).squeeze(1), self.fc["gender"](features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


def _check_input(x: torch.Tensor) -> None:
    # The global mean stands in for face-api's 7x7 average pool only at 112x112.
    if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"expected (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) RGB crops, got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------- weights


def tfjs_to_state_dict(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename face-api's TF.js tensors to this module's state-dict keys and lay them out for torch:
    conv filters HWIO -> OIHW, depthwise [3, 3, C, 1] -> [C, 1, 3, 3], fc [in, out] -> [out, in]."""
    state = {}
    for name, value in weights.items():
        prefix, _, leaf = name.rpartition("/")
        key = prefix.replace("/", ".")
        if leaf == "filters":
            key, value = f"{key}.weight", value.transpose(3, 2, 0, 1)
        elif leaf == "depthwise_filter":
            key, value = f"{key}.depthwise.weight", value.transpose(2, 3, 0, 1)
        elif leaf == "pointwise_filter":
            key, value = f"{key}.pointwise.weight", value.transpose(3, 2, 0, 1)
        elif leaf == "weights":
            key, value = f"{key}.weight", value.T
        elif leaf == "bias":
            key = f"{key}.bias"
        else:
            raise ValueError(f"unexpected TF.js tensor {name!r}")
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def load_faceapi_weights(model: nn.Module, manifest: str | Path) -> nn.Module:
    """Load a face-api TF.js manifest (+ its .bin) into model, strictly; returns model in eval mode."""
    from facedist.models.tfjs import load_tfjs_weights

    model.load_state_dict(tfjs_to_state_dict(load_tfjs_weights(manifest)), strict=True)
    return model.eval()


def weights_of(manifest_relpath: str) -> str:
    """The .bin a face-api manifest names (face-api's naming: <model>-weights_manifest.json)."""
    return manifest_relpath.replace("-weights_manifest.json", ".bin")


def resolve_manifest(relpath: str) -> Path:
    """A face-api manifest through facedist.assets, with its .bin resolved (and verified) too; the
    two must sit in one directory, because the manifest names its .bin relative to itself."""
    from facedist import assets

    binary = assets.resolve(weights_of(relpath))
    manifest = assets.resolve(relpath)
    if binary.parent != manifest.parent:
        raise assets.ModelNotFoundError(
            f"{manifest} and {binary} were found in different directories; put both in one "
            f"(the model directory {assets.MODEL_DIR_ENV} or the cache)")
    return manifest


def faceapi_expression(pretrained: bool = False) -> FaceExpressionNet:
    """face-api's expression net; pretrained: its weights (faceapi/face_expression_model-*)."""
    model = FaceExpressionNet()
    return load_faceapi_weights(model, resolve_manifest(EXPRESSION_MANIFEST)) if pretrained else model


def faceapi_age_gender(pretrained: bool = False) -> AgeGenderNet:
    """face-api's age/gender net; pretrained: its weights (faceapi/age_gender_model-*)."""
    model = AgeGenderNet()
    return load_faceapi_weights(model, resolve_manifest(AGE_GENDER_MANIFEST)) if pretrained else model
