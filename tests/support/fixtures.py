"""The fixtures every test module may use: the Yale faces, a real S3 server on 127.0.0.1 and a
fresh bucket on it (registered for all of tests/ by tests/conftest.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FACEDIST_SHARED", REPO.parent / "shared"))


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports free on 127.0.0.1 now (bound together: ports asked for one at a
    time can repeat)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def yale_dir() -> Path:
    path = SHARED / "data" / "yalefaces"
    if not path.is_dir():
        pytest.fail(f"Yale faces not found at {path}; put ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP server (moto) on 127.0.0.1; yields its endpoint URL.

    Credentials and the endpoint go into the environment, the way users configure MinIO/Ceph, so
    every client (pyarrow.fs, boto3, Ray workers started after this) finds it without patching."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the S3 server; yields 's3://<name>'."""
    import uuid

    import boto3

    name = f"facedist-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"
