"""The app builder and the `facedist serve` entry point.

    serve run facedist.serving:build_app models_uri=s3://bucket/models    # or: facedist serve
    serve deploy serve/config.yaml

Every deployment option (resources, replicas, autoscaling, batch sizes, queue lengths) is derived
here from one ServeSettings; serve/config.yaml passes only `args`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from facedist.serving.deployments import FaceExtractor, FaceRecognizer
from facedist.serving.ingress import FacedistAPI
from facedist.serving.settings import API_TOKEN_ENV, ServeSettings

logger = logging.getLogger("ray.serve")


def _gpus_per_replica(settings: ServeSettings) -> float:
    if settings.num_gpus is not None:
        return settings.num_gpus
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        return 0.5
    return 0.0


def _cluster_cpus() -> float | None:
    import ray

    return ray.cluster_resources().get("CPU") if ray.is_initialized() else None


def _autoscaling(max_replicas: int, target: float, s: ServeSettings) -> dict[str, Any]:
    return {"autoscaling_config": {
        "min_replicas": min(s.min_replicas, max_replicas), "max_replicas": max_replicas,
        "target_ongoing_requests": target, "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s, "look_back_period_s": s.look_back_period_s}}


def deployment_options(s: ServeSettings) -> dict[str, dict[str, Any]]:
    """Each deployment's .options(), all from the settings (resolved: see ServeSettings.resolved)."""
    if s.max_replicas is None or s.ingress_max_accepted_images is None:
        s = s.resolved(_cluster_cpus())
    extractor_actor = {"num_cpus": s.extractor_num_cpus}
    gpus = _gpus_per_replica(s)
    if gpus:
        extractor_actor["num_gpus"] = gpus
    fixed = s.num_replicas is not None
    # Past max_queued_requests a call is turned away at once: the ingress answers 503
    # "overloaded" for a model's (ingress.call_model), the HTTP proxy its own 503 for the ingress.
    backpressure = {"backpressure_config": BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s)}
    # Replicas finish what they hold, for at most shutdown_timeout_s, when the app stops.
    shutdown = {"graceful_shutdown_timeout_s": s.shutdown_timeout_s,
                "graceful_shutdown_wait_loop_s": min(0.5, s.shutdown_timeout_s) or 0.1}
    return {
        "FaceExtractor": {
            "ray_actor_options": extractor_actor,
            "max_ongoing_requests": s.max_ongoing_requests, "max_queued_requests": s.max_queued_requests,
            **backpressure, **shutdown,
            **({"num_replicas": s.num_replicas} if fixed else
               _autoscaling(s.max_replicas, s.target_ongoing_requests, s)),
            **({"max_replicas_per_node": s.max_replicas_per_node} if s.max_replicas_per_node is not None else {})},
        "FaceRecognizer": {
            "ray_actor_options": {"num_cpus": s.recognizer_num_cpus},
            "max_ongoing_requests": s.recognizer_max_ongoing_requests,
            "max_queued_requests": s.recognizer_max_queued_requests, **backpressure, **shutdown,
            **({"num_replicas": 1} if fixed else
               _autoscaling(s.recognizer_max_replicas, s.predict_max_batch_size, s))},
        # One replica: it holds the whole gallery in memory, and deletes go through one process.
        "FaceGallery": {
            "ray_actor_options": {"num_cpus": s.recognizer_num_cpus}, "num_replicas": 1,
            "max_ongoing_requests": s.recognizer_max_ongoing_requests,
            "max_queued_requests": s.recognizer_max_queued_requests, **backpressure, **shutdown},
        "FacedistAPI": {
            "ray_actor_options": {"num_cpus": s.ingress_num_cpus},
            "max_ongoing_requests": s.ingress_max_ongoing_requests,
            "max_queued_requests": s.ingress_max_queued_requests, **backpressure, **shutdown,
            **({"num_replicas": 1} if fixed else
               _autoscaling(s.ingress_max_replicas, s.ingress_target_ongoing_requests, s))},
    }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for `serve run facedist.serving:build_app key=value ...` and serve/config.yaml."""
    from facedist.extractors import landmark_source_for, texture_basis_for

    s = ServeSettings.from_args(args)
    # A combination no backend takes fails here, not in replicas.
    landmark_source_for(s.extract.backend, s.extract.landmark_source)
    texture_basis_for(s.extract.backend, s.extract.texture, s.extract.texture_basis)
    s = s.resolved(_cluster_cpus())
    options = deployment_options(s)
    settings = dataclasses.asdict(s)
    extractor = FaceExtractor.options(**options["FaceExtractor"]).bind(settings)
    # Always part of the app (so one config.yaml fits both cases); without models it loads nothing.
    recognizer = FaceRecognizer.options(**options["FaceRecognizer"]).bind(settings)
    gallery = None
    if s.gallery_uri:
        from facedist.gallery.service import FaceGallery

        gallery = FaceGallery.options(**options["FaceGallery"]).bind(settings)
    return FacedistAPI.options(**options["FacedistAPI"]).bind(extractor, recognizer, settings, gallery)


def run_server(models_uri: str | None = None, *, address: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
               name: str = "facedist", blocking: bool = True, **settings: Any):
    """`facedist serve`: start the app on a Ray cluster (address) or an embedded local one.

    settings: any ServeSettings field (backend, max_batch_size, max_replicas, ...). With
    blocking, it serves until SIGINT or SIGTERM, then stops (stop_server) and returns."""
    from facedist import runtime

    args = {"models_uri": models_uri, **settings}
    build_app(args)  # bad settings fail before Ray starts
    s = ServeSettings.from_args(args)
    warning = exposure_warning(host, port)
    if warning:
        print(f"facedist: warning: {warning}", file=sys.stderr, flush=True)
    runtime.connect(address, ship_package=True)
    # The proxy's own timeout (a plain-text 408) is a backstop behind the ingress's deadline,
    # which answers 504 in the API's shape; the proxy's clock also counts its own queue.
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": 2 * s.request_timeout_s})
    handle = serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=False)
    print(f"facedist serving on http://{host}:{port}{route_prefix} (docs at /docs)", flush=True)
    if blocking:
        signum = wait_for_stop_signal()
        started = time.monotonic()
        abandoned = stop_server(name)
        print(f"facedist: {signal.Signals(signum).name}: stopped in {time.monotonic() - started:.1f} s", flush=True)
        if abandoned:
            os._exit(0)
    return handle


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def exposure_warning(host: str, port: int, environ: dict[str, str] | None = None) -> str | None:
    """What to tell the user when the API listens beyond this machine with no token; else None."""
    environ = os.environ if environ is None else environ
    if host in LOOPBACK_HOSTS or environ.get(API_TOKEN_ENV):
        return None
    return (f"serving on {host} without {API_TOKEN_ENV}: anyone who can reach port {port} can use the "
            f"API (set {API_TOKEN_ENV} to require a bearer token)")


def wait_for_stop_signal() -> int:
    """Block until SIGINT or SIGTERM; return which. A second one exits at once (status 1)."""
    received: list[int] = []
    stop = threading.Event()

    def on_signal(signum, _frame):
        if received:
            os._exit(1)  # asked twice: the person means now
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):  # a bounded wait: the handler runs between waits on any platform
            pass
    finally:
        for sig, handler in previous.items():
            if sig == signal.SIGINT:
                # Shutting down: a second Ctrl-C exits at once rather than raising mid-shutdown.
                signal.signal(sig, lambda *_: os._exit(1))
            else:
                signal.signal(sig, handler)
    return received[0]


def stop_server(name: str) -> bool:
    """Stop serving app `name`: Serve stops routing new requests to it, each replica finishes the
    requests it holds for at most shutdown_timeout_s (Serve's graceful shutdown) and stops; then
    a local Ray started by connect() shuts down, Serve's controller and proxies with it. On a
    cluster joined with --address only this app goes (other apps and Serve itself stay).
    Not serve.shutdown(): its call to the controller is retried when the controller exits, and
    Ray prints that retry as an error line.

    Returns True when the signal also stopped the local Ray's own processes
    (runtime.local_cluster_lost): the graceful part is then cut short (it would wait on a GCS that
    is gone), what is left of Ray is killed, and the caller must leave with os._exit."""
    from facedist import runtime

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="facedist-stop")
    deleted = pool.submit(serve.delete, name)
    pool.shutdown(wait=False)
    while not concurrent.futures.wait([deleted], timeout=0.1).done:
        if runtime.local_cluster_lost():
            runtime.abandon_local_cluster()
            return True
    runtime.disconnect()
    deleted.result()  # what serve.delete raised, if anything
    return False
