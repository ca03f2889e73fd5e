"""facedist.runtime: the one place that decides how Ray starts, what the workers see, how quiet."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from facedist import runtime

REPO = Path(__file__).resolve().parents[1]


def test_worker_env_is_every_facedist_and_aws_variable():
    environ = {"FACEDIST_MODEL_DIR": "/models", "FACEDIST_API_TOKEN": "t", "AWS_ENDPOINT_URL": "http://s3",
               "AWS_PROFILE": "p", "AWS_EMPTY": "", "HOME": "/root", "PYTHONPATH": "/x", "RAY_ADDRESS": "auto"}
    assert runtime.worker_env(environ) == {"FACEDIST_MODEL_DIR": "/models", "FACEDIST_API_TOKEN": "t",
                                           "AWS_ENDPOINT_URL": "http://s3", "AWS_PROFILE": "p"}


def test_local_workers_import_this_checkout_and_remote_ones_get_the_package(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("FACEDIST_MODEL_DIR", "/models")
    local = runtime.runtime_env(local=True)
    assert local["env_vars"]["FACEDIST_MODEL_DIR"] == "/models"
    # This test runs from a checkout (not an installed wheel): its folder goes first on the path.
    assert local["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    remote = runtime.runtime_env(local=False, ship_package=True)
    assert "PYTHONPATH" not in remote["env_vars"]
    assert remote["py_modules"] == [str(REPO / "facedist")]
    assert "py_modules" not in runtime.runtime_env(local=False)


def test_train_polls_fast_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    default = runtime.RAY_TRAIN_SETTINGS["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    assert runtime.runtime_env(local=False)["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == default
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    assert runtime.runtime_env(local=False)["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"


def test_inside_a_submitted_job_the_jobs_runtime_env_rules(monkeypatch):
    # Ray refuses to merge a ray.init runtime_env that repeats the job's variables.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert runtime.runtime_env(local=False) is None


def test_the_address_is_the_flag_then_ray_address_then_local(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert runtime.target_address("auto") == "auto"
    assert runtime.target_address(None) == "ray://head:10001"
    monkeypatch.delenv("RAY_ADDRESS")
    assert runtime.target_address(None) is None


def test_details_go_to_the_log_file_unless_verbose(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    log = runtime.details()
    log("fold 0 expression acc=0.5")
    for handler in logging.getLogger("facedist.details").handlers:
        handler.flush()
    assert "fold 0 expression" in runtime.log_file().read_text()
    assert capsys.readouterr().out == ""
    runtime.set_verbose(True)
    try:
        assert runtime.details() is print
    finally:
        runtime.set_verbose(False)


@pytest.mark.ray
def test_a_local_ray_answers_the_state_api_ray_train_polls(local_ray):
    """Without the dashboard process Ray Train's placement-group cleaner logs "Failed to query
    Ray Train Controller actor state" on every poll; connect() starts it (the shared local Ray is
    connect()'s)."""
    from ray.util.state import list_actors

    ray_module = local_ray

    @ray_module.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return 1

    probe = Probe.remote()
    assert ray_module.get(probe.ping.remote()) == 1
    # This cluster's address: without it the state API takes the newest session on the
    # machine, which may be another test's cluster.
    actors = list_actors(address=ray_module.get_runtime_context().gcs_address, timeout=30)
    assert any(a.class_name.endswith("Probe") and a.state == "ALIVE" for a in actors), actors
    ray_module.kill(probe)
    runtime.disconnect()  # what a command does at its end: a Ray connected with keep=True runs on
    assert ray_module.is_initialized()
