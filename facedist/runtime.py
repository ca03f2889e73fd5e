"""The one Ray runtime of facedist: how to connect, what environment reaches the workers, how
much Ray says.

Extraction, training, `facedist run`, `facedist train` and serving all start Ray through
connect(), so they agree on:

* where: an explicit address, else RAY_ADDRESS (set by `ray job submit`), else a local cluster
  started here, with at least 2 logical CPUs. A local cluster gets the dashboard process, bound
  to 127.0.0.1 on a free port: Ray's State API lives there, and Ray Train's placement-group
  cleaner polls it (without it every poll logs "Failed to query Ray Train Controller actor
  state", as with include_dashboard=False).
* what the workers see: every FACEDIST_* and AWS_* variable of this process (model directory,
  cache, API token, S3 endpoint and credentials), and the same facedist as this process.
* how Ray Train paces itself: its controller polls the workers every
  RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s) and each ray.train.report waits for the
  poll that takes the one before, so every epoch cost at least 2 s however small the model.
  facedist reports every epoch, so its jobs poll every 0.2 s (RAY_TRAIN_SETTINGS; a value in the
  environment wins).
* how quiet: by default Ray's own logging goes to a file (log_file()), worker output is not
  echoed, and the user sees facedist's progress and one summary line per stage; verbose (the
  `--verbose` flag or FACEDIST_VERBOSE=1) shows all of Ray's output as usual.

This module and the adapters (extraction.distributed, training.distributed, serving) are where Ray lives.
"""

from __future__ import annotations

import logging
import os
import site
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

WORKER_ENV_PREFIXES = ("FACEDIST_", "AWS_")
VERBOSE_ENV = "FACEDIST_VERBOSE"
LOG_FILE_ENV = "FACEDIST_RAY_LOG"
# Ray's loggers on the driver; in quiet mode they write to the log file only.
# Ray settings facedist's jobs run with unless the environment sets them (see the docstring).
RAY_TRAIN_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
# Set by `ray job submit` in the driver's environment: the job's runtime_env then rules.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

_quiet_configured = False
_started_here = False  # connect() initialised Ray in this process without keep: disconnect() shuts it down
_file_handler: logging.Handler | None = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(flag: bool) -> None:
    """The --verbose flag; kept in the environment so subprocesses and workers agree."""
    if flag:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def log_file() -> Path:
    """Where Ray's driver-side logging goes in quiet mode (FACEDIST_RAY_LOG overrides)."""
    return Path(os.environ.get(LOG_FILE_ENV) or Path(tempfile.gettempdir()) / "facedist" / "ray.log")


def _log_file_handler() -> logging.Handler:
    """One handler on log_file(), shared by Ray's loggers and facedist's detail lines."""
    global _file_handler
    if _file_handler is None:
        path = log_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        _file_handler = logging.FileHandler(path)
        _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return _file_handler


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the workers need, from this process's: every FACEDIST_* and AWS_* variable."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(WORKER_ENV_PREFIXES) and v}


def ray_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RAY_TRAIN_SETTINGS, each overridden by the environment's value when it has one."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name) or default for name, default in RAY_TRAIN_SETTINGS.items()}


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _package_on_default_path() -> bool:
    """Whether a fresh interpreter finds this facedist without help (an installed wheel)."""
    root = _package_root()
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return any(os.path.realpath(d) == os.path.realpath(root) for d in dirs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def target_address(address: str | None) -> str | None:
    """The cluster to connect to: the address given, else RAY_ADDRESS; None: start a local one."""
    return address or os.environ.get("RAY_ADDRESS") or None


def runtime_env(local: bool, ship_package: bool = False) -> dict[str, Any] | None:
    """The runtime_env facedist's jobs start with.

    local: a cluster started here, whose workers run this interpreter; from a checkout (not an
    installed wheel) the package's folder goes on their PYTHONPATH. ship_package: upload this
    facedist to a remote cluster (serving; the batch jobs expect the code there already, from
    `ray job submit --working-dir` or the image)."""
    if os.environ.get(_JOB_CONFIG_ENV):
        return None
    env: dict[str, Any] = {"env_vars": {**ray_settings(), **worker_env()}}
    if local and not _package_on_default_path():
        current = os.environ.get("PYTHONPATH")
        root = _package_root()
        env["env_vars"]["PYTHONPATH"] = f"{root}{os.pathsep}{current}" if current else root
    if ship_package and not local:
        env["py_modules"] = [str(Path(__file__).resolve().parent)]
        env["excludes"] = ["__pycache__", "*.pyc"]
    return env


def quiet_ray_logging() -> None:
    """Ray's driver-side loggers write everything to log_file(); the terminal keeps their errors
    only (not in verbose mode). Ray Data configures its logger when imported, so it is imported
    first and then re-pointed."""
    global _quiet_configured
    if verbose() or _quiet_configured:
        return
    import ray.data  # noqa: F401  (sets up the "ray.data" logger, which this then adjusts)

    handler = _log_file_handler()
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for console in logger.handlers:
            if isinstance(console, logging.StreamHandler) and not isinstance(console, logging.FileHandler):
                console.setLevel(logging.ERROR)
        if name == "ray" or not logger.propagate:  # the others reach the file through "ray"
            logger.addHandler(handler)
    _quiet_configured = True


def details() -> Callable[[str], None]:
    """Where facedist's step-by-step lines (per fold, per epoch) go: the terminal with --verbose,
    else the log file, so the terminal keeps one summary line per stage."""
    if verbose():
        return print
    logger = logging.getLogger("facedist.details")
    if not logger.handlers:
        logger.addHandler(_log_file_handler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger.info


def connect(address: str | None = None, *, num_cpus: float | None = None, ship_package: bool = False,
            keep: bool = False, **init_kwargs: Any):
    """Ray, connected: to `address`, to RAY_ADDRESS, or to a local cluster started here. A no-op
    when Ray is already initialised (a test's cluster, a job's driver). Returns the ray module.
    keep: disconnect() leaves it running, as a Ray initialised by someone else (a process that
    runs many commands in turn, such as a test session)."""
    import ray

    if ray.is_initialized():
        quiet_ray_logging()
        return ray
    target = target_address(address)
    local = target is None
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(local, ship_package), "log_to_driver": verbose()}
    if local:
        # The dashboard process serves the State API Ray Train polls; on loopback, any free port.
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port())
        # At least 2 logical CPUs: the defaults (2 extraction actors beside their decode tasks,
        # a Train worker beside a Serve app's 1.5 CPUs) are fractional shares that then fit
        # even a 1-core machine, where they take turns.
        kwargs["num_cpus"] = num_cpus if num_cpus is not None else max(2, os.cpu_count() or 1)
    kwargs.update(init_kwargs)
    if not verbose():
        print(f"facedist: {'starting a local Ray' if local else f'connecting to Ray at {target}'}; "
              f"Ray's logs: {log_file()} and /tmp/ray/session_latest/logs (--verbose shows them)",
              file=sys.stderr, flush=True)
    quiet_ray_logging()
    # "local": a new cluster of our own. With None, Ray joins any cluster `ray start` left
    # running on this machine (/tmp/ray/ray_current_cluster), and then refuses num_cpus.
    ray.init(address="local" if local else target, **kwargs)
    global _started_here
    _started_here = not keep
    return ray


def training_cpus() -> float:
    """CPUs one training worker can be given now: the largest live node's, but no more than the
    cluster has free (on a shared cluster other work, a Serve app say, keeps its share)."""
    import ray

    largest = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")), default=1.0)
    return min(largest, ray.available_resources().get("CPU", 0.0))


def local_cluster_lost() -> bool:
    """Whether a process of the local Ray that connect() started has exited. A SIGTERM sent to the
    whole process group (systemd's default, `kill -TERM -PGID`, `timeout`) reaches Ray's own
    processes too (they block SIGINT, not SIGTERM): the dashboard and log monitor go at once, the
    GCS and raylet within seconds. Then nothing graceful can be done: a call that needs the GCS
    retries it for a minute before the process is killed."""
    if not _started_here:
        return False
    import ray

    node = ray._private.worker._global_node
    return node is not None and bool(node.dead_processes())


def abandon_local_cluster() -> None:
    """Kill what is left of a local Ray that lost its processes (local_cluster_lost), at once:
    ray.shutdown() would wait on its GCS. The caller then exits with os._exit (Ray's exit hook
    would call ray.shutdown())."""
    import ray

    global _started_here
    node = ray._private.worker._global_node
    if node is not None:
        node.kill_all_processes(check_alive=False, allow_graceful=False)
    _started_here = False


def disconnect() -> None:
    """Leave the Ray that connect() joined or started (a local cluster stops with it); Ray
    initialised by someone else (a test, a job's driver) is left alone."""
    global _started_here
    if _started_here:
        import ray

        ray.shutdown()
        _started_here = False
