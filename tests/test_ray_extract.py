"""The Ray Data extraction job, end to end: real local Ray, real 3DDFA_V2 extractor on Yale faces,
a real S3 server (moto on 127.0.0.1), a worker killed mid-batch, an interrupted run resumed."""

from __future__ import annotations


import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facedist import storage
from facedist.extraction.config import ExtractConfig
from facedist.extraction.output import SUMMARY_NAME, list_parts
from facedist.extraction.distributed import RayExtractConfig, part_name, plan_resources, run_ray_extraction
from support.faces import GEOMETRY_ONLY, GEOMETRY_ONLY_FLAGS

REPO = Path(__file__).resolve().parents[1]

# Yale images both detectors find a face in (dlib's one miss is subject11.rightlight).
YALE_OK = [f"subject{n:02d}.{cond}" for n in (1, 2, 3, 4, 5, 6) for cond in ("normal", "happy")]


def _config(**kw) -> RayExtractConfig:
    batch = kw.pop("batch_size", 4)
    extract = {k: kw.pop(k) for k in ("detector", "resume") if k in kw}
    return RayExtractConfig(extract=ExtractConfig(backend="tddfa", batch_size=batch, **GEOMETRY_ONLY, **extract),
                            progress=False, **kw)


def _read_output(uri: str):
    """The output parts read back with pyarrow (not through the code under test)."""
    parts = list_parts(uri)
    assert parts, f"no parts under {uri}"
    fs, _ = storage.filesystem_for(uri)
    return pq.ParquetDataset([storage.filesystem_for(p)[1] for p in parts], filesystem=fs).read()


# ---- no Ray needed -------------------------------------------------------------------------------

def test_part_names_depend_only_on_the_rows():
    rows = [{"path": "a", "content_hash": "1"}, {"path": "b", "content_hash": "2"}]
    assert part_name("run", rows) == part_name("run", [dict(r) for r in rows])  # a retry rewrites it
    assert part_name("run", rows) != part_name("run", rows[:1])
    assert part_name("run", rows) != part_name("run", [rows[0], {"path": "b", "content_hash": "3"}])
    assert part_name("run", rows).startswith("part-run-") and part_name("run", rows).endswith(".parquet")


def test_resource_plan_leaves_room_for_decoding_and_uses_gpus():
    cpu = plan_resources(RayExtractConfig(actors=2), {"CPU": 2.0})
    assert 0 < cpu["num_cpus"] * 2 <= 2.0 - 0.25 and cpu["num_gpus"] == 0 and cpu["device"] == "cpu"
    assert cpu["torch_threads"] == 1
    big = plan_resources(RayExtractConfig(actors=4), {"CPU": 64.0, "GPU": 4.0})
    assert big == {"num_cpus": 1.0, "num_gpus": 1.0, "device": "cuda", "torch_threads": 1}


# ---- the command line job (a driver joining the shared local Ray, as under `ray job submit`) -------

@pytest.mark.ray
def test_job_script_extracts_a_manifest_with_labels(local_ray, tmp_path, yale_dir):
    images = tmp_path / "images"
    images.mkdir()
    lines = ["path,subject,gender,expression"]
    for name in YALE_OK[:4]:
        (images / name).write_bytes((yale_dir / name).read_bytes())
        lines.append(f"images/{name},person-{name[7:9]},female,{name.split('.')[1]}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "extract.py"), "--input", str(tmp_path / "manifest.csv"),
         "--output", str(out), "--backend", "tddfa", *GEOMETRY_ONLY_FLAGS, "--actors", "1", "--batch-size", "2",
         "--no-progress", "--address", local_ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "facedist extract: 4 rows" in proc.stderr
    table = _read_output(str(out))
    assert table.num_rows == 4
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("subject").to_pylist()) == {"person-01", "person-02"}
    assert set(table.column("gender").to_pylist()) == {"female"}
    assert (out / SUMMARY_NAME).is_file()


# ---- on the shared local Ray (tests/support/ray.py) ------------------------------------------------

@pytest.fixture
def ray_local(local_ray):
    from ray import cloudpickle

    # The test-only extractors below must reach the actors by value: tests/ is not importable there.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return local_ray


def _jpeg(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _odd_inputs(yale_dir: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected status): every kind of input a bucket holds."""
    face = np.asarray(Image.open(yale_dir / "subject07.normal").convert("RGB"))
    faces = [np.asarray(Image.open(yale_dir / f"subject{n:02d}.normal").convert("RGB")) for n in (8, 9, 10, 12)]
    group = np.concatenate([np.concatenate(faces[:2], axis=1), np.concatenate(faces[2:], axis=1)], axis=0)
    huge = np.asarray(Image.fromarray(face).resize((8000, 8000), Image.Resampling.BILINEAR))
    good = (yale_dir / "subject13.normal").read_bytes()
    return {
        "huge-8000x8000.jpg": (_jpeg(huge, quality=60), "ok"),
        "group-of-four.jpg": (_jpeg(group, quality=90), "ok"),
        "blank.png": (_png(np.full((240, 320, 3), 128, np.uint8)), "no_face"),
        "truncated.gif": (good[: len(good) // 2], "error"),
        "zero-bytes.jpg": (b"", "error"),
        "notes.txt": (b"this is not an image\n" * 20, "error"),
        "random-with-jpeg-magic.jpg": (b"\xff\xd8\xff" + os.urandom(5000), "error"),
    }


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.ray
def test_bucket_to_bucket_on_a_real_s3_server(ray_local, s3_server, s3_bucket, yale_dir):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    source = s3_bucket.removeprefix("s3://")
    expected = {}
    for name in YALE_OK[:6]:
        s3.put_object(Bucket=source, Key=f"raw/{name}", Body=(yale_dir / name).read_bytes())
        expected[f"{s3_bucket}/raw/{name}"] = "ok"
    for name, (data, status) in _odd_inputs(yale_dir).items():
        s3.put_object(Bucket=source, Key=f"raw/odd/{name}", Body=data)
        expected[f"{s3_bucket}/raw/odd/{name}"] = status
    target = f"coeffs-{source[-8:]}"
    s3.create_bucket(Bucket=target)

    out = f"s3://{target}/run1"
    summary = run_ray_extraction(f"{s3_bucket}/raw/", out, _config(actors=2, batch_size=4))

    # Read back with plain pyarrow over the same S3 server.
    fs = pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                           region="us-east-1", access_key="testing", secret_key="testing")
    keys = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{target}/run1"))
            if i.path.endswith(".parquet")]
    table = pq.ParquetDataset(keys, filesystem=fs).read()
    assert table.num_rows == len(expected)                      # rows in = rows out
    got = dict(zip(table.column("path").to_pylist(), table.column("status").to_pylist()))
    assert got == expected
    rows = {r["path"]: r for r in table.to_pylist()}
    group = rows[f"{s3_bucket}/raw/odd/group-of-four.jpg"]
    assert group["num_faces"] >= 2
    huge = rows[f"{s3_bucket}/raw/odd/huge-8000x8000.jpg"]
    assert max(huge["width"], huge["height"]) <= 2048            # downscaled at decode
    assert len(huge["id_coeffs"]) == 40 and len(huge["exp_coeffs"]) == 10
    assert "empty" in rows[f"{s3_bucket}/raw/odd/zero-bytes.jpg"]["message"]
    assert "not an image" in rows[f"{s3_bucket}/raw/odd/notes.txt"]["message"]
    assert rows[f"{s3_bucket}/raw/subject01.normal"]["subject"] == "subject01"

    counts = {status: list(expected.values()).count(status) for status in ("ok", "no_face", "error")}
    assert counts == {"ok": 8, "no_face": 1, "error": 4}
    assert json.loads(fs.open_input_stream(f"{target}/run1/{SUMMARY_NAME}").read())["counts"] == counts
    assert summary["counts"] == counts
    assert summary["run"]["unaccounted"] == 0
    assert summary["layout"]["backend"] == "tddfa" and summary["layout"]["model_version"]


class _DiesOnce:
    """Builds the real tddfa extractor, whose first extract call kills its own process."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, config: ExtractConfig):
        return _DyingExtractor(config.build_extractor(), self.marker)


class _DyingExtractor:
    def __init__(self, inner, marker: str):
        self.inner, self.marker = inner, marker
        self.name, self.layout = inner.name, inner.layout

    def extract(self, images):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(17)  # a hard death mid-batch, as from the OOM killer: no exception, no cleanup
        return self.inner.extract(images)


@pytest.mark.ray
def test_an_actor_killed_mid_batch_is_replaced_and_its_batch_retried(ray_local, tmp_path, yale_dir):
    paths = [str(yale_dir / name) for name in YALE_OK[:8]]
    marker = tmp_path / "died"
    summary = run_ray_extraction(paths, str(tmp_path / "out"),
                                 _config(actors=1, batch_size=4, extractor_factory=_DiesOnce(str(marker))))
    assert marker.is_file()                                     # it did die
    table = _read_output(str(tmp_path / "out"))
    assert sorted(table.column("path").to_pylist()) == sorted(paths)   # each once: nothing lost or doubled
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert summary["run"]["written"] == 8 and summary["run"]["unaccounted"] == 0


@pytest.mark.ray
def test_an_interrupted_run_resumes_where_it_stopped(ray_local, tmp_path, yale_dir):
    """Ctrl-C the job script (a second driver on the same cluster) once parts appear, then rerun."""
    import signal
    import time

    # 48 Yale photos: 24 batches of 2, so the job is still running when its first part lands.
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject"))[:48]:
        os.link(path, images / path.name)
    out = tmp_path / "out"
    job = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "extract.py"), "--input", str(images), "--output", str(out),
         "--backend", "tddfa", *GEOMETRY_ONLY_FLAGS, "--address", ray_local.get_runtime_context().gcs_address,
         "--actors", "1", "--batch-size", "2", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list_parts(str(out)) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, "the job ended before it could be interrupted:\n" + job.stdout.read()[-3000:]
        job.send_signal(signal.SIGINT)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0
    time.sleep(1.0)  # the interrupted driver's actors are being torn down; let any last part land
    first = _read_output(str(out))
    total = len(storage.list_files(str(images)))
    assert 0 < first.num_rows < total
    assert not (out / SUMMARY_NAME).exists()

    summary = run_ray_extraction(str(images), str(out), _config(actors=2, batch_size=8))
    assert summary["run"]["skipped"] == first.num_rows
    assert summary["run"]["written"] == total - first.num_rows
    table = _read_output(str(out))
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == total           # no image twice, none missing
    assert summary["rows"] == total and summary["counts"]["error"] == 0

    again = run_ray_extraction(str(images), str(out), _config(actors=1, batch_size=8))
    assert again["run"]["written"] == 0 and again["run"]["skipped"] == total


@pytest.mark.ray
def test_other_settings_are_refused_before_any_work_then_replaced(ray_local, tmp_path, yale_dir):
    from facedist.extraction.output import OutputSettingsError

    paths = [str(yale_dir / name) for name in YALE_OK[:4]]
    out = str(tmp_path / "out")
    run_ray_extraction(paths, out, _config(actors=1))
    parts = sorted(list_parts(out))
    with pytest.raises(OutputSettingsError, match="detector"):
        run_ray_extraction(paths, out, _config(actors=1, detector="dlib"))
    assert sorted(list_parts(out)) == parts  # nothing written, nothing removed

    summary = run_ray_extraction(paths, out, _config(actors=1, detector="dlib", resume=False))
    assert summary["rows"] == 4 and summary["run"]["written"] == 4
    assert not any(storage.exists(p) for p in parts)  # the old parts are gone, not mixed in
    assert summary["layout"]["detector"].startswith("hog:dlib")
