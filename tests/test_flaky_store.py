"""A flaky object store: the moto S3 server behind tests/support/faultproxy.py, which answers 503
SlowDown, 500 or resets the connection on a share of requests. Extraction and training must
complete through it with nothing lost or doubled and their retries counted; a store that stays
down fails the job naming the URI and keeps what was written; an upload cut off before its
commit is never taken as done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facedist import storage
from facedist.extraction.config import ExtractConfig
from facedist.extraction.output import SUMMARY_NAME, list_parts
from support.faces import GEOMETRY_ONLY, GEOMETRY_ONLY_FLAGS
from support.faultproxy import FaultProxy  # tests/ is on the path (tests/conftest.py)
from support.ray import fresh_ray

REPO = Path(__file__).resolve().parents[1]
FAULT_RATE = 0.10
pytestmark = pytest.mark.multinode  # fault tests: the CI budget's own marker (pyproject.toml)


@pytest.fixture(scope="module")
def proxy(s3_server):
    """The proxy in front of moto; every client in this module (and Ray's workers, started after)
    talks to it through AWS_ENDPOINT_URL, as users point theirs at MinIO."""
    proxy = FaultProxy(s3_server, seed=16).start()
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    yield proxy
    os.environ["AWS_ENDPOINT_URL"] = saved
    proxy.stop()


@pytest.fixture
def faults(proxy):
    """Faults on FAULT_RATE of the requests for one test; the proxy is healthy again after it."""
    proxy.fault_rate, proxy.down = FAULT_RATE, False
    proxy.counts.clear()
    yield proxy
    proxy.fault_rate, proxy.down = 0.0, False
    proxy.release()


def _bucket(s3_server, name: str) -> str:
    """A bucket made directly on moto (setup is not under test)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


def _upload_yale(s3_server, bucket: str, yale_dir: Path, count: int) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    names = sorted(p.name for p in yale_dir.iterdir() if p.name.startswith("subject"))[:count]
    for name in names:
        s3.put_object(Bucket=bucket.removeprefix("s3://"), Key=f"raw/{name}", Body=(yale_dir / name).read_bytes())
    return [f"{bucket}/raw/{name}" for name in names]


def _direct(s3_server):
    """Read back straight from moto, not through the proxy or the retry layer."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                             region="us-east-1", access_key="testing", secret_key="testing")


def _output_paths(s3_server, out: str) -> list[str]:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = _direct(s3_server)
    prefix = out.removeprefix("s3://")
    keys = [i.path for i in fs.get_file_info(pafs.FileSelector(prefix))
            if i.path.rsplit("/", 1)[-1].startswith("part-") and i.path.endswith(".parquet")]
    return pq.ParquetDataset(keys, filesystem=fs).read(columns=["path"]).column("path").to_pylist() if keys else []


# ---- the storage layer alone -----------------------------------------------------------------------

def _round_trip(prefix: str, options: storage.S3Options, count: int) -> None:
    for i in range(count):
        storage.write_bytes(f"{prefix}/{i:03d}.bin", f"object {i}".encode() * 50, options)
    assert len(storage.list_files(prefix, options)) == count
    for i in range(count):
        assert storage.read_bytes(f"{prefix}/{i:03d}.bin", options) == f"object {i}".encode() * 50


def test_storage_retries_transient_faults_and_counts_them(s3_server, faults):
    bucket = _bucket(s3_server, "flaky-roundtrip")
    before = storage.stats_snapshot()
    _round_trip(f"{bucket}/ok", storage.S3Options.from_env(), 60)
    report = storage.stats_report(storage.stats_since(before))
    assert faults.injected() > 0
    assert report["retries"] > 0 and report["gave_up"] == 0
    assert set(report["errors"]) <= {"503 SlowDown", "500 InternalError", "connection reset"}
    assert {"503 SlowDown", "500 InternalError"} <= set(report["errors"])

    # The same workload with retries turned off does not survive the same faults.
    no_retries = storage.S3Options(endpoint_url=faults.endpoint, retry=storage.RetryPolicy(max_attempts=1))
    with pytest.raises(storage.StoreUnavailableError, match=f"{bucket}/off/"):
        _round_trip(f"{bucket}/off", no_retries, 60)


# ---- extraction --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local(proxy):
    import ray

    fresh_ray()  # its workers must see the proxy's settings
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _wait_until_idle(ray, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, "the failed job's workers never let go of their CPUs"
        time.sleep(0.2)


def _extract_config(**kw):
    from facedist.extraction.distributed import RayExtractConfig

    return RayExtractConfig(extract=ExtractConfig(backend="tddfa", batch_size=4, **GEOMETRY_ONLY), progress=False,
                            **kw)


@pytest.mark.ray
def test_extraction_reads_and_writes_through_a_flaky_store(ray_local, s3_server, faults, yale_dir):
    from facedist.extraction.distributed import run_ray_extraction

    source = _bucket(s3_server, "flaky-extract")
    inputs = _upload_yale(s3_server, source, yale_dir, 24)
    out = f"{source}/coeffs"
    summary = run_ray_extraction(f"{source}/raw/", out, _extract_config(actors=2))
    paths = _output_paths(s3_server, out)
    assert sorted(paths) == sorted(inputs)                  # rows in = rows out, none twice
    assert summary["counts"] == {"ok": 24, "no_face": 0, "error": 0}   # no read failure became a row
    retries = summary["run"]["storage"]
    assert faults.injected() > 0 and retries["retries"] > 0 and retries["gave_up"] == 0
    assert retries["operations"] >= 24 + 6                  # every read and part write is counted
    assert sum(retries["errors"].values()) >= retries["retries"]


@pytest.mark.ray
def test_a_store_that_stays_down_fails_the_job_naming_it_and_keeps_the_rows(ray_local, s3_server, proxy,
                                                                            yale_dir):
    from facedist.extraction.distributed import run_ray_extraction

    source = _bucket(s3_server, "down-extract")
    inputs = _upload_yale(s3_server, source, yale_dir, 12)
    out = f"{source}/coeffs"
    proxy.counts.clear()
    # Down for good once two parts are committed (CompleteMultipartUpload of a part-* key).
    proxy.down_after("POST", r"/coeffs/part-[^?]*\?uploadId=", 2)
    few = storage.S3Options(endpoint_url=proxy.endpoint, retry=storage.RetryPolicy(max_attempts=3))
    try:
        with pytest.raises(storage.StoreUnavailableError, match=r"unavailable for s3://down-extract/coeffs/") as info:
            run_ray_extraction(f"{source}/raw/", out, _extract_config(actors=1), options=few)
        assert "part(s) before it stopped" in str(info.value) and "rerun" in str(info.value)
        _wait_until_idle(ray_local)  # the failed job's actors are gone: none can write once it is up
    finally:
        proxy.down = False
    kept = _output_paths(s3_server, out)
    assert len(kept) == 8 and len(set(kept)) == 8             # the two parts written before it went down

    summary = run_ray_extraction(f"{source}/raw/", out, _extract_config(actors=1))
    assert summary["run"]["skipped"] == 8 and summary["run"]["written"] == 4
    assert sorted(_output_paths(s3_server, out)) == sorted(inputs)


@pytest.mark.slow  # a subprocess extraction
def test_a_part_cut_off_before_its_commit_is_not_taken_as_done(s3_server, proxy, yale_dir):
    """Kill the writer (a single-process `facedist extract`) while the commit of its second part
    (CompleteMultipartUpload, after the data went up) is in flight; resume redoes those rows."""
    source = _bucket(s3_server, "cut-extract")
    inputs = _upload_yale(s3_server, source, yale_dir, 12)
    out = f"{source}/coeffs"
    proxy.hold("POST", r"/coeffs/part-[^?]*\?uploadId=", skip=1)
    cmd = [sys.executable, "-m", "facedist.cli", "extract", f"{source}/raw/", "--out", out, "--backend", "tddfa",
           "--batch-size", "4", *GEOMETRY_ONLY_FLAGS]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        assert proxy.held.wait(240), "the writer never reached its second commit:\n" + writer.stdout.read()[-3000:]
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        proxy.release()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    first = _output_paths(s3_server, out)
    assert len(first) == 4                                   # only the committed part is there
    assert not storage.exists(f"{out}/{SUMMARY_NAME}")

    from facedist.extraction.local import run_extraction
    from facedist.extraction.rows import discover_records

    summary = run_extraction(discover_records(f"{source}/raw/"), out,
                             ExtractConfig(backend="tddfa", batch_size=4, **GEOMETRY_ONLY))
    assert summary["run"]["skipped"] == 4 and summary["run"]["written"] == 8
    assert sorted(_output_paths(s3_server, out)) == sorted(inputs)


@pytest.mark.slow  # a subprocess extraction
def test_local_part_cut_off_before_its_rename_is_not_taken_as_done(tmp_path, yale_dir):
    """Locally the commit is the rename of a hidden temporary file: kill the writer right there."""
    out = tmp_path / "out"
    images = sorted(str(p) for p in yale_dir.iterdir() if p.name.startswith("subject"))[:8]
    script = (
        "import os, signal, sys\n"
        "from facedist.extraction.config import ExtractConfig\n"
        "from facedist.extraction.local import run_extraction\n"
        "from facedist.extraction.rows import discover_records\n"
        "real, renames = os.replace, []\n"
        "def replace(src, dst):\n"
        "    if os.path.basename(dst).startswith('part-'):\n"
        "        renames.append(dst)\n"
        "        if len(renames) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "os.replace = replace\n"
        "run_extraction(discover_records(sys.argv[2:]), sys.argv[1],\n"
        f"               ExtractConfig(backend='tddfa', batch_size=4, **{GEOMETRY_ONLY}))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), *images], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(list_parts(str(out))) == 1
    assert [p.name for p in out.iterdir() if p.name.startswith(".part-")]   # the half-committed one

    from facedist.extraction.local import run_extraction
    from facedist.extraction.rows import discover_records

    summary = run_extraction(discover_records(images), str(out),
                             ExtractConfig(backend="tddfa", batch_size=4, **GEOMETRY_ONLY))
    assert summary["run"]["skipped"] == 4 and summary["run"]["written"] == 4 and summary["rows"] == 8


# ---- training ------------------------------------------------------------------------------------------

@pytest.mark.ray
def test_training_checkpoints_through_a_flaky_store(ray_local, s3_server, faults, tmp_path):
    from facedist.training import TrainConfig, run_training
    from facedist.training.synthetic import SyntheticConfig, synthetic_table

    table, _ = synthetic_table(SyntheticConfig(n_people=8, images_per_person=6, seed=5),
                               expressions=("happy", "sad"))
    data = str(tmp_path / "part-0.parquet")
    storage.write_table(table, data)
    bucket = _bucket(s3_server, "flaky-train")
    config = TrainConfig(task="expression", data=data, output=f"{bucket}/runs", epochs=2, batch_size=16,
                         num_workers=2, cpus_per_worker=0.5, use_gpu=False, patience=50, name="expr-flaky",
                         checkpoint_every_s=0.0)   # a checkpoint every epoch: both go through the flaky store
    summary = run_training(config)
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    files = storage.list_files(f"{bucket}/runs")
    assert sum(f.endswith("trainer_state.pt") for f in files) == config.keep_checkpoints
    assert any(f.endswith("expression/model.pt") for f in files)
    rank0 = summary["storage"]["rank0"]
    assert faults.injected() > 0
    assert rank0["gave_up"] == 0 and summary["storage"]["driver"]["gave_up"] == 0
    assert rank0["operations"] > 0
