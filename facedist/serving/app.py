"""The app builder and the `facedist serve` entry point.

    serve run facedist.serving:build_app models_uri=s3://bucket/models    # or: facedist serve
    serve deploy serve/config.yaml

Every deployment option (resources, replicas, autoscaling, batch sizes, queue lengths) is derived
here from one ServeSettings; serve/config.yaml passes only `args`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ray import serve

from facedist.serving.deployments import FaceExtractor, FaceRecognizer
from facedist.serving.ingress import FacedistAPI
from facedist.serving.settings import ServeSettings

logger = logging.getLogger("ray.serve")


def _gpus_per_replica(settings: ServeSettings) -> float:
    if settings.num_gpus is not None:
        return settings.num_gpus
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        return 0.5
    return 0.0


def _autoscaling(max_replicas: int, target: float, s: ServeSettings) -> dict[str, Any]:
    return {"autoscaling_config": {
        "min_replicas": min(s.min_replicas, max_replicas), "max_replicas": max_replicas,
        "target_ongoing_requests": target, "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s, "look_back_period_s": s.look_back_period_s}}


def deployment_options(s: ServeSettings) -> dict[str, dict[str, Any]]:
    """Each deployment's .options(), all from the settings."""
    extractor_actor = {"num_cpus": s.extractor_num_cpus}
    gpus = _gpus_per_replica(s)
    if gpus:
        extractor_actor["num_gpus"] = gpus
    fixed = s.num_replicas is not None
    return {
        "FaceExtractor": {
            "ray_actor_options": extractor_actor,
            # Room for a full batch plus the next one queuing, or batches could never fill.
            "max_ongoing_requests": max(4 * s.max_batch_size, 32),
            **({"num_replicas": s.num_replicas} if fixed else
               _autoscaling(s.max_replicas, s.target_ongoing_requests, s)),
            **({"max_replicas_per_node": s.max_replicas_per_node} if s.max_replicas_per_node is not None else {})},
        "FaceRecognizer": {
            "ray_actor_options": {"num_cpus": s.recognizer_num_cpus},
            "max_ongoing_requests": max(4 * s.predict_max_batch_size, 32),
            **({"num_replicas": 1} if fixed else
               _autoscaling(s.recognizer_max_replicas, s.predict_max_batch_size, s))},
        "FacedistAPI": {
            "ray_actor_options": {"num_cpus": s.ingress_num_cpus},
            "max_ongoing_requests": s.ingress_max_ongoing_requests,
            **({"num_replicas": 1} if fixed else
               _autoscaling(s.ingress_max_replicas, s.ingress_target_ongoing_requests, s))},
    }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for `serve run facedist.serving:build_app key=value ...` and serve/config.yaml."""
    from facedist.extractors import landmark_source_for, texture_basis_for

    s = ServeSettings.from_args(args)
    # A combination no backend takes fails here, not in replicas.
    landmark_source_for(s.backend, s.landmarks)
    texture_basis_for(s.backend, s.texture, s.texture_basis)
    options = deployment_options(s)
    settings = dataclasses.asdict(s)
    extractor = FaceExtractor.options(**options["FaceExtractor"]).bind(settings)
    # Always part of the app (so one config.yaml fits both cases); without models it loads nothing.
    recognizer = FaceRecognizer.options(**options["FaceRecognizer"]).bind(settings)
    return FacedistAPI.options(**options["FacedistAPI"]).bind(extractor, recognizer, settings)


def run_server(models_uri: str | None = None, *, address: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
               name: str = "facedist", blocking: bool = True, **settings: Any):
    """`facedist serve`: start the app on a Ray cluster (address) or an embedded local one.

    settings: any ServeSettings field (backend, max_batch_size, max_replicas, ...)."""
    from facedist import runtime

    app = build_app({"models_uri": models_uri, **settings})  # bad settings fail before Ray starts
    runtime.connect(address, ship_package=True)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    print(f"facedist serving on http://{host}:{port}{route_prefix} (docs at /docs)", flush=True)
    if blocking:
        import signal

        # SIGTERM (a service manager, `kill`) shuts down like Ctrl-C: no orphaned local Ray.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
            runtime.disconnect()  # a local Ray started here stops with it
    return handle
