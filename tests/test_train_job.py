"""Ray Train end to end: 2 DDP workers on a local Ray, checkpoints, resume, and s3:// on moto."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_two_workers_checkpoint_and_resume(local_ray, table_file, tmp_path):
    out = str(tmp_path / "train")
    first = run_training(_config(table_file, out))
    assert [h["epoch"] for h in first["history"]] == [0, 1]
    assert all(h["workers"] == 2 for h in first["history"])
    # Metrics are reduced over both workers' shards: the whole validation fold is counted.
    assert first["history"][-1]["n_val"] > 0
    bundle = load_model_bundle(first["bundle"])
    assert bundle["task"] == "expression" and bundle["labels"] == sorted(EXPRESSIONS)
    assert bundle["model_config"]["name"] == "resnet32_1d"
    # Same name + output: continues from the epoch-1 checkpoint instead of starting over.
    second = run_training(_config(table_file, out, epochs=4))
    epochs = [h["epoch"] for h in second["history"]]
    assert epochs == [0, 1, 2, 3], epochs
    assert second["history"][0] == first["history"][0]  # carried over from the checkpoint, not re-run
    assert json.loads(storage.read_bytes(storage.join(out, "expression", "metrics.json")))["history"][-1]["epoch"] == 3


def test_reads_and_writes_s3(local_ray, table_file, s3_bucket):
    data_uri = f"{s3_bucket}/coeffs/part-0.parquet"
    with open(table_file, "rb") as fh:
        storage.write_bytes(data_uri, fh.read())
    out = f"{s3_bucket}/runs"
    summary = run_training(_config(data_uri, out, task="cnet", epochs=2, steps_per_epoch=3, batch_size=8,
                                   name="cnet-s3"))
    assert summary["checkpoint"].startswith(s3_bucket[len("s3://"):])
    files = storage.list_files(out)
    assert any(f.endswith("cnet/model.pt") for f in files)
    assert any("cnet-s3" in f and f.endswith("trainer_state.pt") for f in files)
    bundle = load_model_bundle(f"{out}/cnet")
    assert bundle["task"] == "cnet" and bundle["model_config"]["n_id"] == 40
    assert "loo_error_cnet" in bundle["metrics"]


def test_job_cli_runs(local_ray, table_file, tmp_path):
    """The job script itself, a driver joining the running cluster (as under `ray job submit`), one
    worker, then its JSON summary."""
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--task", "gender", "--data", table_file, "--output", str(out),
         "--epochs", "1", "--batch-size", "16", "--cpus-per-worker", "1",
         "--address", local_ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["task"] == "gender" and summary["history"][0]["n_val"] > 0
    assert (out / "gender" / "model.pt").is_file()
