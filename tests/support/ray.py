"""The local Ray the Ray tests share: started on first use (2 CPUs, as every command starts it,
after the S3 server so that its workers inherit the AWS_* settings, as users' would) and kept for
the next test (the commands tests run in-process join it and leave it running), so each module
does not pay for its own start. A test that needs a Ray of its own
(other environment variables for the workers, a multi-node cluster) shuts it down first
(fresh_ray); the next user starts it again."""

from __future__ import annotations

import pytest


@pytest.fixture
def local_ray(s3_server):
    import ray

    from facedist import runtime

    if not ray.is_initialized():
        # keep: the commands a test runs in-process (facedist.cli.main) leave it running.
        runtime.connect(num_cpus=2, keep=True)
    return ray


def fresh_ray() -> None:
    """Shut down the shared Ray, if it runs, for a test that starts its own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
