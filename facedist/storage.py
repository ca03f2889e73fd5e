"""One API over local paths and s3:// object storage (AWS, MinIO, Ceph) through pyarrow.fs.

Credentials come from the standard chain (env, profile, instance profile). The endpoint can be
overridden for MinIO-style stores with `S3Options(endpoint_url=...)`, AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls) -> "S3Options":
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


@lru_cache(maxsize=8)
def _s3_filesystem(options: S3Options) -> pafs.S3FileSystem:
    kwargs: dict = {}
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
    """Write a whole object; local writes go through a temporary file so readers never see half."""
    fs, path = filesystem_for(uri, options)
    if is_s3(uri):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
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
        return pq.read_table(path, filesystem=fs, columns=columns)
    root = uri.rstrip("/") + "/"
    files = [f for f in list_files(uri, options) if f.endswith(".parquet")
             and not any(part.startswith(("_", ".")) for part in f[len(root):].split("/"))]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    paths = [filesystem_for(f, options)[1] for f in files]
    tables = [pq.read_table(p, filesystem=fs, columns=columns) for p in paths]
    return pa.concat_tables(tables, promote_options="default")


def write_table(table: pa.Table, uri: str, options: S3Options | None = None) -> None:
    """Write one Parquet file (atomically for local paths)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue().to_pybytes(), options)
