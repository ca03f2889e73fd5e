"""cluster.yaml is valid for Ray's cluster launcher (the schema shipped in the ray wheel and
Ray's own config preparation), and describes what the README promises."""

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_matches_the_schema_in_the_ray_wheel(config):
    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_ray_prepares_and_validates_it(config):
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]


def test_node_types_and_setup(config):
    types = config["available_node_types"]
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and gpu[0]["max_workers"] > gpu[0]["min_workers"], "an autoscaled GPU worker type"
    assert any(not t["node_config"]["InstanceType"].startswith(("g", "p")) for n, t in types.items()
               if n != config["head_node_type"]), "a CPU worker type"
    for node_type in types.values():
        assert "IamInstanceProfile" in node_type["node_config"], "S3 through an instance profile"
    assert any("pip install" in c and "facedist" in c for c in config["setup_commands"])


def test_invalid_config_is_rejected(config):
    broken = dict(config, max_workers="ten")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(
            (Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text()))


def test_the_dashboard_listens_on_loopback_only(config):
    """The dashboard serves Ray's job API, and a job runs any code: on 0.0.0.0 whoever reaches
    port 8265 owns the cluster. `ray dashboard cluster.yaml` reaches it over SSH instead."""
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
