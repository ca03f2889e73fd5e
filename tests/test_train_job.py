"""Ray Train end to end: 2 DDP workers on a local Ray, checkpoints and resume on s3:// (moto)."""

from __future__ import annotations

import json

import pytest

from facedist import storage
from facedist.training import TrainConfig, load_model_bundle, run_training
from facedist.training.synthetic import SyntheticConfig, synthetic_table

pytestmark = [pytest.mark.slow, pytest.mark.ray]
EXPRESSIONS = ("happy", "sad", "surprised")


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    table, _ = synthetic_table(SyntheticConfig(n_people=12, images_per_person=8, seed=3), expressions=EXPRESSIONS)
    path = tmp_path_factory.mktemp("coeffs") / "part-0.parquet"
    storage.write_table(table, str(path))
    return str(path)


def _config(data: str, output: str, **kw) -> TrainConfig:
    base = dict(task="expression", data=data, output=output, epochs=2, batch_size=16, num_workers=2,
                cpus_per_worker=0.5, use_gpu=False, patience=50, name="expr")
    base.update(kw)
    return TrainConfig(**base)


def test_two_workers_checkpoint_and_resume_on_s3(local_ray, table_file, s3_bucket):
    """The table read from and the checkpoints and bundle written to the S3 server; the same run
    again continues from its last checkpoint there. (The job script under `ray job submit`:
    tests/test_e2e.py.)"""
    data_uri = f"{s3_bucket}/coeffs/part-0.parquet"
    with open(table_file, "rb") as fh:
        storage.write_bytes(data_uri, fh.read())
    out = f"{s3_bucket}/runs"
    first = run_training(_config(data_uri, out))
    assert first["checkpoint"].startswith(s3_bucket[len("s3://"):])
    assert [h["epoch"] for h in first["history"]] == [0, 1]
    assert all(h["workers"] == 2 for h in first["history"])
    # Metrics are reduced over both workers' shards: the whole validation fold is counted.
    assert first["history"][-1]["n_val"] > 0
    files = storage.list_files(out)
    assert any(f.endswith("expression/model.pt") for f in files)
    assert any("/expr/" in f and f.endswith("trainer_state.pt") for f in files)
    bundle = load_model_bundle(first["bundle"])
    assert bundle["task"] == "expression" and bundle["labels"] == sorted(EXPRESSIONS)
    assert bundle["model_config"]["name"] == "resnet32_1d"
    # Same name + output: continues from the epoch-1 checkpoint instead of starting over.
    second = run_training(_config(data_uri, out, epochs=4))
    epochs = [h["epoch"] for h in second["history"]]
    assert epochs == [0, 1, 2, 3], epochs
    assert second["history"][0] == first["history"][0]  # carried over from the checkpoint, not re-run
    assert json.loads(storage.read_bytes(storage.join(out, "expression", "metrics.json")))["history"][-1]["epoch"] == 3
