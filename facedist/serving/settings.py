"""The serving settings: the one place every deployment option of the app comes from.

`facedist serve` flags, `serve run facedist.serving:build_app key=value` and serve/config.yaml's
`args` all fill this dataclass; the app builder derives every deployment's resources, replica
counts and batch sizes from it (the deployment decorators carry none of their own).
"""

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any

from facedist.extractors import DEFAULT_TEXTURE_BASIS

API_TOKEN_ENV = "FACEDIST_API_TOKEN"
MODELS_URI_ENV = "FACEDIST_MODELS_URI"
API_VERSION = "1"


@dataclass
class ServeSettings:
    """Everything the app builder takes (serve/config.yaml `args`, `serve run ... key=value`)."""

    models_uri: str | None = None     # training output with the recognizer bundles; None: /v1/predict is 503
    backend: str = "tddfa"            # make_extractor backend; `facedist serve` passes the CLI default (tddfa-fit)
    detector: str = "faceboxes"       # face detector: faceboxes (one batched forward per batch) or dlib
    landmarks: str | None = None      # 68-point source for fit/deep3d; None: the backend's own
    texture: bool = True              # sample face colour on the fitted mesh (texture backends)
    # tex_coeffs' basis: the shipped one, a .npz URI, or None/"none" (no tex_coeffs)
    texture_basis: str | None = DEFAULT_TEXTURE_BASIS
    face_embedding: bool = True       # dlib's face descriptor of each face (ExtractConfig.face_embedding)
    face_attributes: bool = True      # face-api's expression, age, gender (ExtractConfig.face_attributes)
    device: str = "auto"              # auto: cuda when the replica got a GPU, else cpu
    max_image_bytes: int = 10 * 1024 * 1024
    max_images: int = 16              # per /v1/predict request
    max_side: int = 1024              # uploads are downscaled on decode to at most this side
    top_k: int = 5
    # Batching: max_batch_size=1 turns batching off (the benchmark's baseline).
    max_batch_size: int = 16
    # How long a batch waits to fill after its first image: longer batches cost the detector and
    # the regressor less per image (benchmarks/serve_load.py), for that much latency at low load.
    batch_wait_timeout_s: float = 0.05
    predict_max_batch_size: int = 8
    predict_batch_wait_timeout_s: float = 0.005
    # Resources and autoscaling of the extractor (the expensive part).
    extractor_num_cpus: float = 1.0
    # dlib HOG detection threads per extractor replica, shared by a batch's images (dlib
    # releases the GIL); 0: one per whole CPU of extractor_num_cpus, at least 1.
    detect_threads: int = 0
    num_gpus: float | None = None     # None: 0.5 per extractor replica when the cluster has GPUs
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0  # window the ongoing-request average is taken over
    # Fixed extractor replica count instead of autoscaling (tests, benchmarks); the recognizer
    # and the ingress then run one replica each.
    num_replicas: int | None = None
    # At most this many extractor replicas per node (None: no limit); 1 spreads them, so losing a
    # node loses one replica, not all of them.
    max_replicas_per_node: int | None = None
    # The recognizer (tiny models) and the ingress (parsing, fan-out) autoscale from one replica.
    recognizer_num_cpus: float = 0.25
    recognizer_max_replicas: int = 2
    ingress_num_cpus: float = 0.25
    ingress_max_replicas: int = 2
    ingress_max_ongoing_requests: int = 256
    ingress_target_ongoing_requests: float = 64.0
    # A model call whose replica was lost (its node died) is sent again, to a live replica, up to
    # this many times (extraction and prediction are pure, so a repeat is safe); then 503. A call
    # whose replica died under it is repeated once at most: a request that crashes its replica
    # itself then takes down two replicas, not replica_retries + 1.
    replica_retries: int = 3
    replica_retry_backoff_s: float = 0.5   # the wait before the n-th repeat is n times this

    def __post_init__(self):
        if self.replica_retries < 0 or self.replica_retry_backoff_s < 0:
            raise ValueError(f"replica_retries ({self.replica_retries}) and replica_retry_backoff_s "
                             f"({self.replica_retry_backoff_s}) must be >= 0")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeSettings":
        """Build from builder args, coercing the strings `serve run key=value` passes."""
        args = dict(args or {})
        unknown = set(args) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown serve settings: {', '.join(sorted(unknown))}")
        if not args.get("models_uri") and os.environ.get(MODELS_URI_ENV):
            args["models_uri"] = os.environ[MODELS_URI_ENV]
        values = {f.name: _coerce(args[f.name], f.type, f.name) for f in dataclasses.fields(cls) if f.name in args}
        if values.get("models_uri") == "":
            values["models_uri"] = None
        return cls(**values)

    # -- what the deployments derive from the settings --

    @property
    def extractor_threads(self) -> int:
        """torch threads of an extractor replica: its whole CPUs, at least 1."""
        return max(1, round(self.extractor_num_cpus))

    @property
    def extractor_detect_threads(self) -> int:
        return self.detect_threads or max(1, int(self.extractor_num_cpus))


DEFAULTS = ServeSettings()  # the decorators' batch defaults; replicas set their own from the app's settings


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    if not isinstance(value, str):
        return value
    options = typing.get_args(annotation) or (annotation,)  # no `from __future__ import annotations` here
    if type(None) in options and value.strip().lower() in ("", "none", "null"):
        return None
    if bool in options:
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"serve setting {name}={value!r} is not true or false")
    for kind in (int, float):
        if kind in options:
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"serve setting {name}={value!r} is not a {kind.__name__}") from None
    return value


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
