import pyarrow as pa
import pytest

from facedist import storage
from facedist.schema import CoefficientLayout, layout_from_schema, rows_to_table


def _roundtrip(root: str):
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_bytes(storage.join(root, "a", "b", "y.bin"), b"world")
    storage.write_bytes(storage.join(root, ".hidden"), b"skip me")
    files = storage.list_files(root)
    # Sorted by full path: a/b/y.bin before a/x.bin; the hidden file is skipped.
    assert files == [storage.join(root, "a", "b", "y.bin"), storage.join(root, "a", "x.bin")]
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.exists(storage.join(root, "a", "b", "y.bin"))
    assert not storage.exists(storage.join(root, "nope"))
    assert storage.list_files(storage.join(root, "a", "x.bin")) == [storage.join(root, "a", "x.bin")]

    layout = CoefficientLayout(backend="tddfa", n_id=40, n_exp=10, model_version="abc")
    table = rows_to_table([{"path": "p1", "status": "ok", "id_coeffs": [1.0, 2.0]},
                           {"path": "p2", "status": "error", "message": "bad"}], layout)
    storage.write_table(table, storage.join(root, "t", "part-0.parquet"))
    storage.write_table(table, storage.join(root, "t", "part-1.parquet"))
    back = storage.read_table(storage.join(root, "t"))
    assert back.num_rows == 4
    assert back.column("status").to_pylist() == ["ok", "error", "ok", "error"]
    one = storage.read_table(storage.join(root, "t", "part-0.parquet"))
    assert layout_from_schema(one.schema) == layout
    with pytest.raises(FileNotFoundError):
        storage.list_files(storage.join(root, "missing"))


def test_local_storage(tmp_path):
    _roundtrip(str(tmp_path))


def test_s3_storage_on_a_real_server(s3_bucket):
    _roundtrip(s3_bucket + "/prefix")


def test_a_layout_written_before_landmark_source_was_named_so_still_reads():
    old = '{"backend": "fit", "n_id": 40, "n_exp": 10, "landmarks": "dlib:abc"}'
    assert CoefficientLayout.from_json(old) == CoefficientLayout(backend="fit", n_id=40, n_exp=10,
                                                                 landmark_source="dlib:abc")


def test_schema_rejects_unknown_types():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError)):
        rows_to_table([{"path": "p", "status": "ok", "yaw": "not a number"}])


def test_retries_are_bounded_counted_and_only_for_transient_errors():
    policy = storage.RetryPolicy(max_attempts=4, base_delay_s=0.0)
    calls = []

    def slow_down():
        calls.append(1)
        raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")

    before = storage.stats_snapshot()
    with pytest.raises(storage.StoreUnavailableError, match=r"s3://b/k: 4 attempt\(s\) failed \(503 SlowDown x4\)"):
        storage.with_retries("s3://b/k", policy, slow_down)
    assert len(calls) == 4
    assert storage.stats_report(storage.stats_since(before)) == {
        "operations": 1, "retries": 3, "gave_up": 1, "errors": {"503 SlowDown": 4}}

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    calls.clear()
    with pytest.raises(FileNotFoundError):  # not transient: no retry
        storage.with_retries("s3://b/k", policy, missing)
    assert len(calls) == 1

    answers = iter([OSError("curlCode: 56, Failure when receiving data from the peer"), None])

    def flaky():
        error = next(answers)
        if error:
            raise error
        return "done"

    assert storage.with_retries("s3://b/k", policy, flaky) == "done"


def test_a_store_failure_is_found_behind_rays_wrapping():
    inner = storage.StoreUnavailableError.after("s3://b/part-1.parquet", ["500 InternalError"] * 3)
    wrapped = RuntimeError(f"ray::MapWorker failed\nTraceback ...\nfacedist.storage.StoreUnavailableError: {inner}")
    found = storage.find_store_failure(wrapped)
    assert found is not None and found.uri == "s3://b/part-1.parquet" and str(found) == str(inner)
    assert storage.find_store_failure(RuntimeError("something else")) is None
