"""The serving settings: the one place every deployment option of the app comes from.

`facedist serve` flags, `serve run facedist.serving:build_app key=value` and serve/config.yaml's
`args` all fill this dataclass; the app builder derives every deployment's resources, replica
counts and batch sizes from it (the deployment decorators carry none of their own).
"""

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from facedist.extraction.config import ExtractConfig

API_TOKEN_ENV = "FACEDIST_API_TOKEN"
MODELS_URI_ENV = "FACEDIST_MODELS_URI"
API_VERSION = "1"


@dataclass
class ServeSettings:
    """Everything the app builder takes (serve/config.yaml `args`, `serve run ... key=value`)."""

    models_uri: str | None = None     # training output with the recognizer bundles; None: /v1/predict is 503
    # The gallery (facedist.gallery, local or s3://) behind /v1/gallery, /v1/identify and /v1/verify;
    # None: those answer 503. Its embedding bundle: embedding_uri, else models_uri/embedding.
    gallery_uri: str | None = None
    embedding_uri: str | None = None
    gallery_refresh_s: float = 1.0    # a gallery replica lists the parts at most this often (new enrolments)
    # The extractor and how uploads are decoded (backend, detector, landmark_source, texture, ...,
    # device, max_side, detect_threads). Given flat (`backend: tddfa`, `serve run ... backend=fit`)
    # or as one `extract` mapping; fields not given keep serving_extract_config()'s values.
    extract: ExtractConfig = field(default_factory=lambda: serving_extract_config())
    max_image_bytes: int = 10 * 1024 * 1024
    max_images: int = 16              # per /v1/predict request
    top_k: int = 5
    # Batching: max_batch_size=1 turns batching off (the benchmark's baseline). A batch's answers
    # reach the ingress together, and it handles them one after another: a 503 that comes in
    # meanwhile waits behind them. At 256 clients the 503 p99 was about half as long at 8 as at 16
    # (59-68 ms against 111-117, alternating in one run) for a few percent of throughput.
    max_batch_size: int = 8
    # How long a batch that starts on an idle replica waits to fill (under load a batch takes what
    # queued while the last one ran: facedist.serving.batching): larger batches cost the detector
    # and the regressor less per image (benchmarks/serve_load.py), for that much latency at low load.
    batch_wait_timeout_s: float = 0.05
    predict_max_batch_size: int = 8
    predict_batch_wait_timeout_s: float = 0.005
    # Resources and autoscaling of the extractor (the expensive part).
    extractor_num_cpus: float = 1.0
    # The extractor replica at the lowest CPU priority (nice 19): where it shares a node's cores
    # with the HTTP proxy and the ingress, their short steps (admitting, answering, a 503) go
    # first and the long batches take what is left, so an overloaded server's 503s do not wait
    # behind a batch (benchmarks/serve_load.py --overload).
    extractor_low_priority: bool = True
    num_gpus: float | None = None     # None: 0.5 per extractor replica when the cluster has GPUs
    min_replicas: int = 1
    # None: as many as the cluster's CPUs hold when the app is built (replicas_that_fit): more
    # replicas than CPUs slow every replica down. Set it on a cluster that adds nodes under load.
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    # Up after 3 s above target, down only after 60 s below it (on an average over
    # look_back_period_s): a load step adds replicas once, and a pause in the load shorter than
    # that removes none the next burst needs, so the count does not swing with the load
    # (benchmarks/serve_load.py's step phase counts the changes).
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
    ingress_target_ongoing_requests: float = 64.0
    # Bounded queues (overload answers 503 "overloaded" with Retry-After instead of waiting).
    # max_ongoing_requests: calls one replica works on at once; max_queued_requests: calls each
    # caller (the ingress for the models, the HTTP proxy for the ingress) holds waiting for one.
    # The extractor: a running batch plus the next one filling (a batch must be able to fill);
    # its queue takes up the lag between the ingress freeing a slot and the replica counting
    # its call done (a whole batch's worth can be in that lag; less turned a few away).
    max_ongoing_requests: int = 32
    max_queued_requests: int = 32
    recognizer_max_ongoing_requests: int = 32
    recognizer_max_queued_requests: int = 32
    # The ingress turns the excess away itself (ingress_max_accepted_images, in the API's JSON),
    # so its Serve limits are wide: the HTTP proxy's own 503 (plain text) is a last resort.
    ingress_max_ongoing_requests: int = 512
    ingress_max_queued_requests: int = 512
    # Model work one ingress replica has accepted and not yet answered, in images (a request
    # holds one from arrival, one per image once parsed); past it a request is answered 503
    # "overloaded" before its upload is read (or, for its further images, before model work).
    # None: max_ongoing_requests x the extractor's most replicas (what the extractors hold).
    ingress_max_accepted_images: int | None = None
    # The Retry-After of a 503, in seconds: at least retry_after_s, growing with the clients
    # already told to wait (facedist.serving.ingress.Admission), at most max_retry_after_s.
    retry_after_s: int = 1
    max_retry_after_s: int = 30
    # A request not answered this long after the ingress accepted it is answered 504
    # "deadline_exceeded" and its model calls are cancelled (queued images are never extracted).
    # A client may lower it per request with the X-Request-Timeout header (seconds).
    request_timeout_s: float = 30.0
    # At shutdown a replica gets this long to finish the requests it holds (Serve's
    # graceful_shutdown_timeout_s); `facedist serve` must exit within 10 s of SIGINT / SIGTERM.
    shutdown_timeout_s: float = 3.0
    # A model call whose replica was lost (its node died) is sent again, to a live replica, up to
    # this many times (extraction and prediction are pure, so a repeat is safe); then 503. A call
    # whose replica died under it is repeated once at most: a request that crashes its replica
    # itself then takes down two replicas, not replica_retries + 1.
    replica_retries: int = 3
    replica_retry_backoff_s: float = 0.5   # the wait before the n-th repeat is n times this

    def __post_init__(self):
        if isinstance(self.extract, dict):  # as the deployments get it (dataclasses.asdict)
            self.extract = ExtractConfig(**self.extract)
        if self.replica_retries < 0 or self.replica_retry_backoff_s < 0:
            raise ValueError(f"replica_retries ({self.replica_retries}) and replica_retry_backoff_s "
                             f"({self.replica_retry_backoff_s}) must be >= 0")
        positive = ("max_ongoing_requests", "recognizer_max_ongoing_requests", "ingress_max_ongoing_requests",
                    "request_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")
        # -1 is Serve's "no limit" for a queue; 0 would turn every queued call away.
        for name in ("max_queued_requests", "recognizer_max_queued_requests", "ingress_max_queued_requests"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1, or -1 for no limit")
        for name in ("ingress_max_accepted_images", "max_replicas"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1 (or None)")
        if self.shutdown_timeout_s < 0 or not 0 <= self.retry_after_s <= self.max_retry_after_s:
            raise ValueError(f"need shutdown_timeout_s >= 0 ({self.shutdown_timeout_s}) and "
                             f"0 <= retry_after_s ({self.retry_after_s}) <= max_retry_after_s ({self.max_retry_after_s})")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeSettings":
        """Build from builder args, coercing the strings `serve run key=value` passes."""
        args = dict(args or {})
        if "landmarks" in args:  # the key's name before landmark_source
            args["landmark_source"] = args.pop("landmarks")
        extract_types = typing.get_type_hints(ExtractConfig)
        given = dict(args.pop("extract", None) or {})
        given.update({k: args.pop(k) for k in list(args) if k in extract_types})
        unknown = set(args) - {f.name for f in dataclasses.fields(cls)} | set(given) - set(extract_types)
        if unknown:
            raise ValueError(f"unknown serve settings: {', '.join(sorted(unknown))}")
        if not args.get("models_uri") and os.environ.get(MODELS_URI_ENV):
            args["models_uri"] = os.environ[MODELS_URI_ENV]
        values = {f.name: _coerce(args[f.name], f.type, f.name) for f in dataclasses.fields(cls) if f.name in args}
        for name in ("models_uri", "gallery_uri", "embedding_uri"):
            if values.get(name) == "":
                values[name] = None
        values["extract"] = dataclasses.replace(
            serving_extract_config(), **{k: _coerce(v, extract_types[k], k) for k, v in given.items()})
        return cls(**values)

    # -- what the deployments derive from the settings --

    @property
    def extractor_threads(self) -> int:
        """torch threads of an extractor replica: its whole CPUs, at least 1."""
        return max(1, round(self.extractor_num_cpus))

    @property
    def extractor_detect_threads(self) -> int:
        """dlib HOG detection threads per extractor replica, shared by a batch's images (dlib
        releases the GIL): extract.detect_threads, or 0: one per whole CPU of extractor_num_cpus."""
        return self.extract.detect_threads or max(1, int(self.extractor_num_cpus))

    def replicas_that_fit(self, cluster_cpus: float) -> int:
        """Extractor replicas the cluster's CPUs hold beside one ingress and one recognizer, each
        replica counted at its torch threads (whole CPUs): fractional shares of one core give
        more replicas but no more work done."""
        spare = cluster_cpus - self.ingress_num_cpus - self.recognizer_num_cpus
        return max(1, int(spare // self.extractor_threads))

    def resolved(self, cluster_cpus: float | None) -> "ServeSettings":
        """A copy with every derived bound filled in: max_replicas (what the cluster's CPUs hold;
        4 when no CPUs are known: a config checked without Ray, or a CPU-less head whose worker
        nodes the cluster autoscaler adds later), ingress_max_replicas (no
        more than the extractor's: each ingress replica admits what all the extractors hold)
        and ingress_max_accepted_images (what the extractor replicas work on at once)."""
        max_replicas = self.max_replicas
        if max_replicas is None:
            max_replicas = self.replicas_that_fit(cluster_cpus) if cluster_cpus else 4
        most = self.num_replicas if self.num_replicas is not None else max_replicas
        accepted = self.ingress_max_accepted_images
        if accepted is None:
            accepted = self.max_ongoing_requests * max(1, most)
        return dataclasses.replace(self, max_replicas=max_replicas, ingress_max_accepted_images=accepted,
                                   ingress_max_replicas=min(self.ingress_max_replicas, max(1, most)))


def serving_extract_config() -> ExtractConfig:
    """The server's extraction defaults, where they differ from a batch run's: tddfa (its own
    landmarks, no dlib predictor per replica), the device chosen per replica, and uploads
    downscaled to 1024 px (a phone photo need not be decoded at full size to find one face)."""
    return ExtractConfig(backend="tddfa", device="auto", max_side=1024)


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
