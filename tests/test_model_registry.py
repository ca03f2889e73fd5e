"""facedist.models.registry: models by name, and bundles that store the name (old ones load too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facedist.models.registry import create_model, list_models, register_model
from facedist.training.bundle import build_model


def test_every_builtin_name_builds_its_module():
    assert {"cnet", "resnet34_1d", "resnet32_1d", "resnet34"} <= set(list_models())
    classifier = create_model("resnet32_1d", input_dim=40, num_classes=6).eval()
    assert classifier(torch.zeros(2, 40)).shape == (2, 6)
    cnet = create_model("cnet", input_dim=7, n_id=40).eval()
    assert cnet(torch.zeros(3, 7)).shape == (3, 40)
    image = create_model("resnet18", num_classes=4).eval()
    assert image(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_an_unknown_name_says_which_exist():
    with pytest.raises(ValueError, match="resnet34_1d"):
        create_model("resnet99_1d", input_dim=4, num_classes=2)


def test_a_registered_model_rebuilds_from_its_bundle_config():
    @register_model(name="tiny_linear_for_test")
    def tiny(input_dim: int, num_classes: int) -> nn.Module:
        return nn.Linear(input_dim, num_classes)

    model = build_model({"name": "tiny_linear_for_test", "input_dim": 3, "num_classes": 2})
    assert isinstance(model, nn.Linear) and model.out_features == 2
    with pytest.raises(ValueError, match="already registered"):
        register_model(tiny, name="resnet34")


@pytest.mark.parametrize("old, new", [
    ({"family": "resnet1d", "arch": "resnet32_1d", "input_dim": 10, "num_classes": 3, "dropout": 0.1},
     {"name": "resnet32_1d", "input_dim": 10, "num_classes": 3, "dropout": 0.1}),
    ({"family": "cnet", "input_dim": 5, "n_id": 8, "hidden": 16},
     {"name": "cnet", "input_dim": 5, "n_id": 8, "hidden": 16}),
    ({"family": "resnet2d", "arch": "resnet18", "num_classes": 2, "in_channels": 3},
     {"name": "resnet18", "num_classes": 2, "in_channels": 3}),
])
def test_bundles_written_before_the_registry_still_load(old, new):
    """A "family" config rebuilds the same architecture: the new one's weights load strictly."""
    reference = build_model(new)
    legacy = build_model(old)
    legacy.load_state_dict(reference.state_dict(), strict=True)
    assert type(legacy) is type(reference)
