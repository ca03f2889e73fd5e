"""Test support, not tests: the shared fixtures (fixtures.py, registered by tests/conftest.py), the
Yale photos as arrays (faces.py), a fault-injecting S3 proxy (faultproxy.py), a multi-node Ray
cluster on one machine (multinode.py) and the local Ray the Ray tests share (ray.py)."""
