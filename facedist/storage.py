"""One API over local paths and s3:// object storage (AWS, MinIO, Ceph) through pyarrow.fs.

Credentials come from the standard chain (env, profile, instance profile). The endpoint can be
overridden for MinIO-style stores with `S3Options(endpoint_url=...)`, AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL.

Object stores fail transiently (503 SlowDown, 500, a reset connection). Every S3 call made through
this module, and through the filesystem it hands to Ray Train, goes through one retry policy
(RetryPolicy: bounded attempts, exponential backoff with full jitter); the AWS SDK's own retries
are turned off so none are hidden. Each process counts its operations, retries per error kind and
give-ups (stats_snapshot / stats_since / stats_report) for the jobs' summaries. An operation that
still fails raises StoreUnavailableError naming the URI.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_SCHEME = "s3://"
MAX_ATTEMPTS_ENV = "FACEDIST_S3_MAX_ATTEMPTS"
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often an S3 operation is tried before it fails the job, and how long to wait between."""

    max_attempts: int = 10       # per operation, the first try included; 1 turns retries off
    base_delay_s: float = 0.05   # backoff: a random wait in [0, min(max_delay_s, base * 2**retry)]
    max_delay_s: float = 5.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        value = os.environ.get(MAX_ATTEMPTS_ENV)
        return cls(max_attempts=max(1, int(value))) if value else cls()

    def delay(self, retry: int) -> float:
        # Full jitter: clients that failed together do not come back together.
        return random.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2 ** retry))


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy.from_env)

    @classmethod
    def from_env(cls) -> "S3Options":
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


# ---- retries ---------------------------------------------------------------------------------

class StoreUnavailableError(OSError):
    """The object store kept failing one operation through every attempt of the retry policy."""

    def __init__(self, uri: str, message: str):
        self.uri = uri
        super().__init__(message)

    def __reduce__(self):  # raised in Ray workers, re-raised on the driver
        return type(self), (self.uri, str(self))

    @classmethod
    def after(cls, uri: str, errors: list[str]) -> "StoreUnavailableError":
        kinds = ", ".join(f"{kind} x{n}" for kind, n in Counter(errors).items())
        return cls(uri, f"object store unavailable for {uri}: {len(errors)} attempt(s) failed ({kinds}); "
                        f"what was already written is kept: rerun the same command once the store is back "
                        f"to resume.")


# What a failed call's message says -> the error kind reported; None: not transient, not retried.
_TRANSIENT = (("SLOW_DOWN", "503 SlowDown"), ("SlowDown", "503 SlowDown"), ("HTTP status 503", "503 SlowDown"),
              ("INTERNAL_FAILURE", "500 InternalError"), ("InternalError", "500 InternalError"),
              ("HTTP status 500", "500 InternalError"), ("HTTP status 502", "502 Bad Gateway"),
              ("HTTP status 504", "504 Gateway Timeout"), ("curlCode: 56", "connection reset"),
              ("curlCode: 52", "connection reset"), ("curlCode: 55", "connection reset"),
              ("onnection reset", "connection reset"), ("NETWORK_CONNECTION", "connection reset"),
              ("curlCode: 7,", "connection refused"), ("curlCode: 28", "timeout"),
              ("REQUEST_TIMEOUT", "timeout"), ("SERVICE_UNAVAILABLE", "503 SlowDown"))


def transient_kind(exc: BaseException) -> str | None:
    if isinstance(exc, (FileNotFoundError, PermissionError, StoreUnavailableError)) or not isinstance(exc, OSError):
        return None
    message = str(exc)
    return next((kind for needle, kind in _TRANSIENT if needle in message), None)


_stats: Counter = Counter()
_stats_lock = threading.Lock()


def _count(**amounts: int) -> None:
    with _stats_lock:
        _stats.update(amounts)


def stats_snapshot() -> Counter:
    """This process's S3 counts so far: operations, retries, gave_up and one "error:<kind>" per kind."""
    with _stats_lock:
        return Counter(_stats)


def stats_since(snapshot: Counter) -> Counter:
    return stats_snapshot() - snapshot


def stats_report(stats: Counter | dict) -> dict:
    """Counts as the summaries show them: {operations, retries, gave_up, errors: {kind: n}}."""
    stats = Counter(stats)
    return {"operations": stats["operations"], "retries": stats["retries"], "gave_up": stats["gave_up"],
            "errors": {k[len("error:"):]: n for k, n in sorted(stats.items()) if k.startswith("error:") and n}}


def stats_json(stats: Counter) -> str | None:
    """Counts as JSON, to travel with a batch's results from a worker to the driver."""
    return json.dumps(stats) if stats else None


def add_stats_json(total: Counter, values: list[str | None]) -> None:
    for value in values:
        if value:
            total.update(json.loads(value))


def find_store_failure(exc: BaseException) -> "StoreUnavailableError | None":
    """The StoreUnavailableError behind an exception. Ray wraps a task's error in its own
    (RayTaskError, UserCodeException) and may keep the original only in its traceback text."""
    seen: set[int] = set()
    text = str(exc)
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StoreUnavailableError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    found = re.search(r"StoreUnavailableError: (object store unavailable for (\S+): .*)", text)
    return StoreUnavailableError(found.group(2).rstrip(":"), found.group(1)) if found else None


def with_retries(uri: str, policy: RetryPolicy, call: Callable[[], T]) -> T:
    """call() under the retry policy: transient errors are retried after a jittered backoff, others
    raise at once; the last transient one raises StoreUnavailableError(uri)."""
    _count(operations=1)
    errors: list[str] = []
    attempts = max(1, policy.max_attempts)
    for attempt in range(attempts):
        try:
            return call()
        except OSError as exc:
            kind = transient_kind(exc)
            if kind is None:
                raise
            errors.append(f"{kind}")
            _count(**{f"error:{kind}": 1})
            last = exc
            if attempt + 1 < attempts:
                _count(retries=1)
                time.sleep(policy.delay(attempt))
    _count(gave_up=1)
    raise StoreUnavailableError.after(uri, errors) from last


class _UploadOnClose(io.BytesIO):
    """An output stream held in memory and sent as one object when closed: a PUT is all or
    nothing, so an interrupted writer leaves no object, and a failed one is simply sent again."""

    def __init__(self, upload: Callable[[bytes], None]):
        super().__init__()
        self._upload = upload

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self._upload(data)


class RetryingS3Handler(pafs.FileSystemHandler):
    """pyarrow.fs.S3FileSystem with every call under one RetryPolicy (pyarrow.fs.PyFileSystem
    handler, so Ray Train and pyarrow.parquet use it like any filesystem). Inputs are read whole
    and outputs written whole, each read or write one retried operation."""

    def __init__(self, options: S3Options):
        self.options = options

    def __reduce__(self):  # pickled into Ray workers by its options; they build their own client
        return RetryingS3Handler, (self.options,)

    @property
    def _fs(self) -> pafs.S3FileSystem:
        return _raw_s3_filesystem(self.options)

    def _retry(self, path: str, call: Callable[[], T]) -> T:
        return with_retries(S3_SCHEME + path, self.options.retry, call)

    def get_type_name(self) -> str:
        return "facedist-s3"

    def normalize_path(self, path):
        return self._fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._retry(paths[0] if len(paths) == 1 else os.path.commonprefix(list(paths)) or "",
                           lambda: self._fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry(selector.base_dir, lambda: self._fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._retry(path, lambda: self._fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._retry(path, lambda: self._fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry(path, lambda: self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise PermissionError("facedist never deletes a whole S3 account's contents")

    def delete_file(self, path):
        self._retry(path, lambda: self._fs.delete_file(path))

    def move(self, src, dest):
        def move_once():
            # A retry after a move that went through but whose answer was lost: nothing left to do.
            if self._fs.get_file_info(src).type == pafs.FileType.NotFound and \
                    self._fs.get_file_info(dest).type != pafs.FileType.NotFound:
                return
            self._fs.move(src, dest)
        self._retry(src, move_once)

    def copy_file(self, src, dest):
        self._retry(src, lambda: self._fs.copy_file(src, dest))

    def _read_all(self, path) -> bytes:
        def read():
            with self._fs.open_input_stream(path) as stream:
                return stream.read()
        return self._retry(path, read)

    def open_input_stream(self, path):
        return pa.BufferReader(self._read_all(path))

    def open_input_file(self, path):
        return pa.BufferReader(self._read_all(path))

    def open_output_stream(self, path, metadata):
        def upload(data: bytes) -> None:
            def put():
                with self._fs.open_output_stream(path, metadata=metadata) as stream:
                    stream.write(data)
            self._retry(path, put)
        return pa.PythonFile(_UploadOnClose(upload), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("S3 objects cannot be appended to")


@lru_cache(maxsize=8)
def _s3_filesystem(options: S3Options) -> pafs.FileSystem:
    return pafs.PyFileSystem(RetryingS3Handler(options))


@lru_cache(maxsize=8)
def _raw_s3_filesystem(options: S3Options) -> pafs.S3FileSystem:
    # The SDK's own retries are off: RetryingS3Handler retries, and counts what it retries.
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)}
    if options.endpoint_url:
        scheme, _, rest = options.endpoint_url.partition("://")
        kwargs["endpoint_override"] = rest or scheme
        kwargs["scheme"] = scheme if rest else "https"
        # Local/MinIO-style stores have no region concept; pin one so the SDK does not probe AWS.
        kwargs["region"] = options.region or "us-east-1"
        kwargs["allow_bucket_creation"] = True
    elif options.region:
        kwargs["region"] = options.region
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str, options: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or s3://bucket/key URI."""
    uri = str(uri)
    if is_s3(uri):
        return _s3_filesystem(options or S3Options.from_env()), uri[len(S3_SCHEME):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _to_uri(uri: str, path: str) -> str:
    return S3_SCHEME + path if is_s3(uri) else path


def absolute(uri: str | None) -> str | None:
    """s3:// URIs unchanged; local paths made absolute, since Ray workers (Train in particular) run
    in directories of their own where a relative path means something else."""
    if uri is None or uri == "" or is_s3(uri):
        return uri
    return str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return S3_SCHEME + posixpath.join(uri[len(S3_SCHEME):].rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def list_files(uri: str, options: S3Options | None = None, *, recursive: bool = True) -> list[str]:
    """All files under a folder or prefix (hidden files skipped), sorted, as URIs/paths.
    A URI naming one file lists just that file."""
    fs, path = filesystem_for(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [_to_uri(uri, path)]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file, folder or prefix: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    files = [
        i.path for i in infos
        if i.type == pafs.FileType.File and not any(p.startswith(".") for p in i.path[len(path):].split("/"))
    ]
    return sorted(_to_uri(uri, p) for p in files)


def exists(uri: str, options: S3Options | None = None) -> bool:
    fs, path = filesystem_for(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, options: S3Options | None = None) -> bytes:
    fs, path = filesystem_for(uri, options)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes, options: S3Options | None = None) -> None:
    """Write a whole object. Readers never see half of one: on S3 a PUT is all or nothing; locally
    the bytes go to a hidden temporary file (skipped by list_files) that is then renamed."""
    fs, path = filesystem_for(uri, options)
    if is_s3(uri):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def makedirs(uri: str, options: S3Options | None = None) -> None:
    fs, path = filesystem_for(uri, options)
    fs.create_dir(path, recursive=True)


def move(src: str, dst: str, options: S3Options | None = None) -> None:
    """Move one file (a rename locally; copy then delete on S3)."""
    fs, src_path = filesystem_for(src, options)
    _, dst_path = filesystem_for(dst, options)
    if not is_s3(dst):
        Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
    fs.move(src_path, dst_path)


def delete(uri: str, options: S3Options | None = None) -> None:
    fs, path = filesystem_for(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def read_table(uri: str, options: S3Options | None = None, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, or every Parquet file under a folder/prefix, as one table. As in Hive and
    Spark, files and folders whose names start with "_" or "." are not data (e.g. _replaced/)."""
    fs, path = filesystem_for(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return _read_parquet(path, fs, columns)
    paths = [filesystem_for(f, options)[1] for f in parquet_files(uri, options)]
    tables = [_read_parquet(p, fs, columns) for p in paths]
    return pa.concat_tables(tables, promote_options="default")


def parquet_files(uri: str, options: S3Options | None = None) -> list[str]:
    """The Parquet files read_table reads, in its order: the file itself, or the files under a
    folder/prefix except those under names starting with "_" or "."."""
    fs, path = filesystem_for(uri, options)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return [uri]
    root = uri.rstrip("/") + "/"
    files = [f for f in list_files(uri, options) if f.endswith(".parquet")
             and not any(part.startswith(("_", ".")) for part in f[len(root):].split("/"))]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    return files


def _read_parquet(path: str, fs, columns: list[str] | None) -> pa.Table:
    """One file; ``columns`` that the file lacks (a table written before a column existed) are
    left out rather than failing the read. A file of an older schema version reads with the
    current column names (schema.legacy_renames: version 1's face-api `age` is faceapi_age, and
    such a file has no labelled `age`)."""
    from facedist.schema import METADATA_SCHEMA_KEY, SCHEMA_VERSION, legacy_renames

    schema = pq.read_schema(path, filesystem=fs)
    renames = legacy_renames(schema)
    if columns is not None:
        source = {renames.get(name, name): name for name in schema.names}  # current name -> file's
        columns = [source[c] for c in columns if c in source]
    table = pq.read_table(path, filesystem=fs, columns=columns)
    if renames:
        metadata = table.schema.metadata or {}   # rename_columns drops it (the layout with it)
        table = table.rename_columns([renames.get(name, name) for name in table.column_names])
        table = table.replace_schema_metadata({**metadata, METADATA_SCHEMA_KEY: SCHEMA_VERSION.encode()})
    return table


def write_table(table: pa.Table, uri: str, options: S3Options | None = None) -> None:
    """Write one Parquet file (atomically for local paths)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue().to_pybytes(), options)
