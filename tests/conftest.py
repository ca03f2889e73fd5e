"""The test suite's set-up: the model directory, the order of the tests, the shared fixtures
(tests/support/fixtures.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEDIST_SHARED", REPO.parent / "shared"))

# Tests read the development assets beside the checkout unless the caller chose a model dir.
os.environ.setdefault("FACEDIST_MODEL_DIR", str(SHARED / "models"))

from support.fixtures import s3_bucket, s3_server, yale_dir  # noqa: E402  (tests/ is on sys.path)
from support.ray import local_ray  # noqa: E402
from support.serving import client, extractor, face_bytes, models_uri, server  # noqa: E402

# Fixtures, used by name.
__all__ = ["client", "extractor", "face_bytes", "local_ray", "models_uri", "s3_bucket", "s3_server", "server",
           "yale_dir"]


@pytest.hookimpl(tryfirst=True)  # before -m selects: `ray` implies `slow`
def pytest_collection_modifyitems(config, items):
    """Tests that start Ray (marked `ray`) run last and together, each module's in its own order:
    the quick tests report first, and run with no Ray cluster taking the cores. A Ray test is a
    slow test (`-m "not slow"`, the inner loop, leaves out Ray, browsers and long training)."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.slow)
    # The modules that serve tests/support/serving.py's app (test_serve.py, test_web.py) run last,
    # together: one app (a session fixture, on its own Ray) serves both, and no later test finds
    # that Ray in its way.
    serving = {item.module for item in items if _serves(item)}
    items.sort(key=lambda item: (item.get_closest_marker("ray") is not None, item.module in serving))


def _serves(item) -> bool:
    definitions = getattr(item, "_fixtureinfo", None) and item._fixtureinfo.name2fixturedefs.get("server")
    return bool(definitions) and definitions[-1].func.__module__ == "support.serving"
