"""The served app the HTTP tests (test_serve.py) and the page tests (test_web.py) share: small
real bundles trained once per session on real Yale coefficients and put on the moto S3 server,
a local Ray Serve app on them, once per session (on a Ray of its own: the replicas must inherit
the token), per module a client with the token, a photo."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from support.fixtures import free_port
from support.ray import fresh_ray

TOKEN = "test-token-123"
MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGES = 4
APP_NAME = "facedist-test"
PERSON = ("subject01.happy", "subject01.sad", "subject01.surprised")


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def extractor():
    from facedist.extractors import make_extractor

    return make_extractor("tddfa")


def extract_files(extractor, paths) -> list[dict]:
    from facedist.datasets import parse_yale_name
    from facedist.extraction.rows import extract_rows
    from facedist.images import decode_image

    rows = []
    for path in paths:
        labels = parse_yale_name(path.name) or {}
        rows.append({"path": path.name, "subject": labels.get("subject"), "expression": labels.get("expression"),
                     "image": decode_image(path.read_bytes())})
    finished, _ = extract_rows(rows, extractor)
    return finished


@pytest.fixture(scope="session")
def models_uri(yale_dir, s3_server, extractor, tmp_path_factory):
    """Small C-Net, identity and expression bundles trained on real Yale coefficients (tddfa),
    written to a bucket on the moto S3 server: the server loads them from s3:// like production."""
    import boto3
    import torch

    from facedist.schema import YALE_EXPRESSIONS, rows_to_table
    from facedist.training import TrainConfig, save_model_bundle, train_and_save
    from facedist.training.data import table_to_data

    torch.manual_seed(0)
    paths = sorted(p for p in yale_dir.iterdir() if p.name.split(".")[-1] in YALE_EXPRESSIONS)
    table = rows_to_table(extract_files(extractor, paths), extractor.layout)
    data = table_to_data(table)
    local = tmp_path_factory.mktemp("models")
    bucket = "facedist-serve-models"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/run1"
    for cfg in (TrainConfig(task="cnet", epochs=2, steps_per_epoch=3, batch_size=16),
                TrainConfig(task="identity", epochs=6, batch_size=32, cnet=str(local / "cnet"), aggregate="cnet",
                            max_combos_per_subject=20),
                TrainConfig(task="expression", epochs=4, batch_size=32, labels=list(YALE_EXPRESSIONS))):
        train_and_save(cfg, data, str(local / cfg.task))
    # Yale has no ages: one per person (20 + 3 x its number) wires the age model end to end.
    from facedist.training.presets import preset_config

    data.age = np.array([20.0 + 3 * int(str(s).removeprefix("subject")) for s in data.subject])
    train_and_save(preset_config("age", epochs=10, inputs=("id",)), data, str(local / "age"))
    for name in ("cnet", "identity", "expression", "age"):
        save_model_bundle(torch.load(local / name / "model.pt", weights_only=False), f"{uri}/{name}")
    return uri


@pytest.fixture(scope="session")
def server(models_uri):
    """Serve the app on 127.0.0.1:<free port>; yields (base_url, settings). Once a session: the
    modules that use it run last, one after the other (tests/conftest.py), and each cleans up the
    apps it adds beside it."""
    import ray
    from ray import serve

    from facedist import runtime
    from facedist.serving.app import run_server

    saved_token = os.environ.get("FACEDIST_API_TOKEN")
    os.environ["FACEDIST_API_TOKEN"] = TOKEN  # replicas read it when they start
    fresh_ray()  # the replicas must inherit the token: a Ray started before it was set would not pass it on
    runtime.connect(num_cpus=2)  # what `facedist serve` would start, with 2 CPUs
    port = free_port()
    try:
        # Half a CPU for the extractor: test_web.py adds a second app to this 2-CPU cluster.
        settings = {"models_uri": models_uri, "max_image_bytes": MAX_IMAGE_BYTES, "max_images": MAX_IMAGES,
                    "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "num_replicas": 1,
                    "extractor_num_cpus": 0.5}
        # What `facedist serve` runs (Ray is already up, so it is used as is).
        run_server(settings.pop("models_uri"), host="127.0.0.1", port=port, name=APP_NAME, blocking=False, **settings)
        yield f"http://127.0.0.1:{port}", settings
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved_token is None:
            os.environ.pop("FACEDIST_API_TOKEN", None)
        else:
            os.environ["FACEDIST_API_TOKEN"] = saved_token


@pytest.fixture(scope="module")
def client(server):
    import httpx

    base_url, _ = server
    with httpx.Client(base_url=base_url, timeout=120.0,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.fixture(scope="module")
def face_bytes(yale_dir) -> bytes:
    return (yale_dir / "subject01.normal").read_bytes()


def error_of(response) -> dict:
    body = response.json()
    assert "error" in body, body
    return body["error"]
