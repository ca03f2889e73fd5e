"""Models by name, timm-style: create_model("resnet34_1d", input_dim=40, num_classes=15).

A model bundle stores {"name": ..., **kwargs} and is rebuilt with create_model(**that); a new
architecture is one entry here (or register_model for one defined elsewhere), not a new branch
in every loader. The built-in names map to "module:function" and import only when asked for.
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

_BUILTIN = {
    "cnet": "facedist.models.cnet:cnet",                    # C-Net: per-image identity confidences
    "resnet34_1d": "facedist.models.resnet1d:resnet34_1d",  # coefficient classifiers
    "resnet32_1d": "facedist.models.resnet1d:resnet32_1d",
    "linear_head": "facedist.models.heads:linear_head",     # light heads over whitened descriptors
    "mlp_head": "facedist.models.heads:mlp_head",
    "resnet18": "facedist.models.resnet:resnet18",          # the raw-image baseline (2-D)
    "resnet34": "facedist.models.resnet:resnet34",
    "resnet50": "facedist.models.resnet:resnet50",
    # dlib's 128-d face descriptor on 150x150 chips (face-api's weights)
    "dlib_resnet_descriptor": "facedist.models.face_descriptor:dlib_resnet_descriptor",
    "faceapi_expression": "facedist.models.faceapi:faceapi_expression",  # face-api's nets (TF.js weights)
    "faceapi_age_gender": "facedist.models.faceapi:faceapi_age_gender",
}
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Decorator: make fn(**kwargs) -> nn.Module available to create_model under its name."""
    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _BUILTIN or key in _REGISTERED:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTERED[key] = f
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTERED})


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    module, _, attr = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def create_model(name: str, **kwargs) -> nn.Module:
    return model_entrypoint(name)(**kwargs)
