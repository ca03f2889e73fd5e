"""The model bundle: one directory per trained model, read by the server and the Recognizer.

    <dir>/model.pt   torch.save of a dict:
        task          "cnet" | "identity" | "expression" | "gender" | "image_identity" | ...
        model_config  {"name": a facedist.models.registry name, **its keyword arguments}
        state_dict    the module's weights (plain, never DDP-prefixed)
        labels        class names in output order ([] for C-Net)
        layout        CoefficientLayout JSON of the table it was trained on
        input_norm    {"mean": [...], "std": [...]} applied to the model's input vector
        metrics       final validation metrics (accuracy, macro_f1, ...)
        extra         task specifics (e.g. combo size, aggregation, C-Net used)
        format_version
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from facedist import storage

BUNDLE_FILE = "model.pt"
FORMAT_VERSION = 1


def build_model(model_config: dict) -> nn.Module:
    """Rebuild a module from its bundle config: create_model(name, **kwargs). Bundles written
    before the registry name a "family" instead; they still load."""
    from facedist.models.registry import create_model

    config = dict(model_config)
    if "name" not in config:
        family = config.pop("family")
        if family == "cnet":
            config["name"] = "cnet"
        elif family in ("resnet1d", "resnet2d"):
            config["name"] = config.pop("arch", "resnet34")
        else:
            raise ValueError(f"unknown model family {family!r}")
    return create_model(**config)


def make_bundle(*, task: str, model_config: dict, state_dict: dict, labels: list[str], layout_json: str,
                input_norm: dict | None, metrics: dict, extra: dict | None = None) -> dict:
    return {"format_version": FORMAT_VERSION, "task": task, "model_config": dict(model_config),
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "labels": list(labels),
            "layout": layout_json, "input_norm": input_norm, "metrics": dict(metrics),
            "extra": dict(extra or {})}


def save_model_bundle(bundle: dict, directory: str) -> str:
    """Write <directory>/model.pt (local path or s3:// URI); returns the file's URI."""
    buffer = io.BytesIO()
    torch.save(bundle, buffer)
    target = storage.join(directory, BUNDLE_FILE)
    if storage.is_s3(directory):
        storage.write_bytes(target, buffer.getvalue())
    else:
        Path(directory).mkdir(parents=True, exist_ok=True)
        # Atomic replace, so a reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
            tmp.write(buffer.getvalue())
        os.replace(tmp.name, target)
    return target


def load_model_bundle(location: str, *, build: bool = True, map_location: str = "cpu") -> dict:
    """Read a bundle from a directory or a model.pt (local or s3://). With build=True the dict
    gains "model": the module in eval mode with its weights loaded strictly."""
    uri = location if str(location).endswith(".pt") else storage.join(location, BUNDLE_FILE)
    bundle = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location=map_location, weights_only=False)
    if build:
        model = build_model(bundle["model_config"])
        model.load_state_dict(bundle["state_dict"], strict=True)
        bundle["model"] = model.eval()
    return bundle
