"""Closed-loop HTTP load on the serve app: each face detector batched vs unbatched, against the
single-process extraction rate, and autoscaling observed.

    FACEDIST_MODEL_DIR=../shared/models .venv/bin/python benchmarks/serve_load.py [--quick]

Everything runs on one local Ray (loopback only). Phases, in one run so the ratios compare like
with like on the same machine:
  0. the single-process rate: the same images decoded and extracted in this process, before Ray
     starts, on all cores (what one process gets without HTTP or Serve); and the no-model
     ceiling: an endpoint that parses the upload and answers without a model, behind the same
     proxy and client (what Serve itself costs here; no model endpoint can beat it)
  1. for each detector (faceboxes, dlib), one extractor replica with the same settings:
     batched (the serve settings' max_batch_size) and unbatched (max_batch_size=1) at concurrency 1, 8, 32
  2. autoscaling (min 1, max 2 replicas, short delays, the first detector): load at concurrency
     32, then idle; the extractor's replica count is sampled from serve.status() throughout.
Each level is bounded by a request count and a time limit. Clients are asyncio httpx
coroutines, each sending its next request when the previous answer arrives (closed loop).
Output: JSON (requests/s, p50/p99 latency, errors, replicas observed) to
benchmarks/results/serve_load.json and stdout.

    ... benchmarks/serve_load.py --overload [--quick]

Overload instead (benchmarks/results/serve_overload.json): the app as `facedist serve` builds it
(the serve settings' defaults, bounded queues, autoscaling bounded by the CPUs) with small
recognition models trained here on Yale, closed-loop clients at 1, 8, 32, 128, 256 on
/v1/extract and /v1/predict (3 photos of one person a request). Every request ends in a counted
answer: goodput (2xx/s), the share of 503s, p50/p99 of the 2xx and of the 503 answers, 504s and
client errors, and the extractor's replica count sampled throughout. Clients join at --spawn-per-s
(a load tool's spawn rate); the top level runs once more with every client starting at once (the
herd). "Steady": from 10 s into a level until its last request was sent (no ramp, no drain). A client that gets a 503
waits its Retry-After (jittered x0.5-1.5) before its next request, as a well-behaved client does
(--retry immediate: no wait). In the same run, the baseline: the same app with the queues
unbounded (the settings before bounded queues) at 32 and 256 clients; and a load step on an
autoscaling extractor (max 2 replicas) with the default delays, its replica count sampled.
"""

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXTRACTOR = "FaceExtractor"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_images(data_dir: Path, count: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in data_dir.iterdir() if p.name.startswith("subject"))[:count]
    return [(p.name, p.read_bytes()) for p in files]


async def closed_loop(url: str, images, concurrency: int, max_requests: int, max_seconds: float,
                      headers: dict) -> dict:
    """`concurrency` clients, each posting its next image once the last answer is in."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def client(worker: int, session: httpx.AsyncClient):
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            name, data = images[(issued + worker) % len(images)]
            issued += 1
            start = time.perf_counter()
            try:
                response = await session.post(url, files={"image": (name, data)}, headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300.0, limits=limits) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(w, session) for w in range(concurrency)))
        wall = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000.0
    return {
        "concurrency": concurrency,
        "requests_ok": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3) if wall else None,
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
                       "p99": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
                       "mean": round(float(lat.mean()), 1) if lat.size else None},
    }


def no_model_ceiling(port: int, images, levels, args) -> dict:
    """Serve's own cost on this machine: an ingress that parses the same multipart upload and
    answers without any model, behind the same HTTP proxy, with the same client. No endpoint
    with a model can go faster."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="NoModel", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(api)
    class NoModel:
        @api.post("/v1/extract")
        async def extract(self, request: Request) -> dict:
            form = await request.form()
            data = await form.getlist("image")[0].read()
            await form.close()
            return {"bytes": len(data)}

    serve.run(NoModel.bind(), name="bench-no-model", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/extract"
    asyncio.run(closed_loop(url, images, 2, args.warmup, 120, {}))
    results = []
    for concurrency in levels:
        max_requests = max(args.min_requests, args.requests_per_client * concurrency) * 4
        result = asyncio.run(closed_loop(url, images, concurrency, max_requests, args.max_seconds, {}))
        results.append(result)
        print(f"[no-model ceiling] c={concurrency}: {result['requests_per_s']} req/s", flush=True)
    serve.delete("bench-no-model")
    return {"levels": results}


def single_process_rate(images, detector: str, rounds: int = 10) -> dict:
    """Images/s of decode + extract in this process on every core (torch's default threads, dlib
    threads = cores), batches of 16, best of `rounds` passes over the images after a warm-up."""
    from facedist.extractors import make_extractor
    from facedist.images import decode_image

    extractor = make_extractor("tddfa", detector=detector, detect_threads=os.cpu_count() or 1)
    extractor.extract([decode_image(images[0][1])])
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(images), 16):
            extractor.extract([decode_image(data) for _, data in images[i:i + 16]])
        best = min(best, time.perf_counter() - started)
    return {"images": len(images), "seconds": round(best, 3), "images_per_s": round(len(images) / best, 2)}


def replica_states(app_name: str) -> dict[str, int]:
    """The extractor's replicas by state (STARTING, RUNNING, STOPPING, ...)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or EXTRACTOR not in app.deployments:
        return {}
    return {str(getattr(state, "value", state)): int(n)
            for state, n in app.deployments[EXTRACTOR].replica_states.items() if n}


def running_by_deployment(app_name: str) -> dict[str, int]:
    """RUNNING replicas of every deployment of the app."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: int(sum(n for state, n in d.replica_states.items()
                          if str(getattr(state, "value", state)) == "RUNNING"))
            for name, d in app.deployments.items()}


def running_replicas(app_name: str) -> int:
    return replica_states(app_name).get("RUNNING", 0)


class ReplicaSampler:
    """Samples the extractor's RUNNING replica count in a background thread."""

    def __init__(self, app_name: str, period_s: float = 0.5, all_deployments: bool = False):
        self.app_name, self.period_s, self.all_deployments = app_name, period_s, all_deployments
        self.samples: list[tuple[float, int]] = []           # (t, RUNNING replicas)
        self.states: list[tuple[float, dict]] = []           # (t, replicas by state)
        self.deployments: list[tuple[float, dict]] = []      # (t, RUNNING replicas by deployment)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _run(self):
        while not self._stop.is_set():
            try:
                states = replica_states(self.app_name)
                self.samples.append((round(time.perf_counter() - self.t0, 2), states.get("RUNNING", 0)))
                self.states.append((round(time.perf_counter() - self.t0, 2), states))
                if self.all_deployments:
                    self.deployments.append((round(time.perf_counter() - self.t0, 2),
                                             running_by_deployment(self.app_name)))
            except Exception:  # a status call failing once must not end the benchmark
                pass
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def max_between(self, t_from: float, t_to: float) -> int:
        values = [n for t, n in self.samples if t_from <= t <= t_to]
        return max(values) if values else 0


def deploy(app_name: str, settings: dict, port: int):
    from ray import serve

    from facedist.serving import build_app

    serve.run(build_app(settings), name=app_name, route_prefix="/")
    return f"http://127.0.0.1:{port}/v1/extract"


def extractor_stats(app_name: str, reset: bool = True) -> dict:
    """Batch sizes and per-image CPU ms per extractor stage (detect, regress, ...) since the last
    reset: where a request's time goes, and which part batching can shrink."""
    from ray import serve

    handle = serve.get_deployment_handle(EXTRACTOR, app_name)
    stats = handle.stats.remote().result()
    if reset:
        handle.reset_stats.remote().result()
    images = max(int(stats.get("images") or 0), 1)
    cpu = stats.get("stage_seconds", {}).get("cpu", {})
    return {"batch_sizes": {int(k): v for k, v in sorted(stats["batch_sizes"].items(), key=lambda kv: int(kv[0]))},
            "images": stats.get("images"),
            "cpu_ms_per_image": {stage: round(seconds / images * 1000, 2) for stage, seconds in cpu.items()}}


def throughput_phase(name: str, settings: dict, port: int, images, levels, args, headers) -> dict:
    from ray import serve

    app_name = f"bench-{name}"
    url = deploy(app_name, {**settings, "num_replicas": 1}, port)
    asyncio.run(closed_loop(url, images, 2, args.warmup, 120, headers))  # warm-up: first calls
    extractor_stats(app_name)
    results = []
    for concurrency in levels:
        max_requests = max(args.min_requests, args.requests_per_client * concurrency)
        result = asyncio.run(closed_loop(url, images, concurrency, max_requests, args.max_seconds, headers))
        result["replicas_observed"] = running_replicas(app_name)
        result["extractor"] = extractor_stats(app_name)
        results.append(result)
        print(f"[{name}] c={concurrency}: {result['requests_per_s']} req/s, "
              f"p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms, "
              f"errors {result['errors']}", flush=True)
    serve.delete(app_name)
    return {"settings": settings, "levels": results}


def autoscaling_phase(settings: dict, port: int, images, args, headers) -> dict:
    from ray import serve

    app_name = "bench-autoscale"
    url = deploy(app_name, settings, port)
    asyncio.run(closed_loop(url, images, 2, args.warmup, 120, headers))
    before = running_replicas(app_name)
    with ReplicaSampler(app_name) as sampler:
        t_load = time.perf_counter() - sampler.t0
        load = asyncio.run(closed_loop(url, images, 32, 100_000, args.autoscale_load_s, headers))
        t_idle = time.perf_counter() - sampler.t0
        # Idle: wait until the extra replica is gone (bounded).
        deadline = time.perf_counter() + args.autoscale_idle_s
        scaled_down_at = None
        while time.perf_counter() < deadline:
            time.sleep(1.0)
            if running_replicas(app_name) <= settings["min_replicas"]:
                scaled_down_at = time.perf_counter() - sampler.t0
                break
        time.sleep(1.0)
    samples = sampler.samples
    peak = sampler.max_between(t_load, t_idle + 1.0)
    upscaled_at = next((t for t, n in samples if t >= t_load and n > settings["min_replicas"]), None)
    # The autoscaler's decision shows as a STARTING replica; RUNNING follows once its models loaded.
    decided_at = next((t for t, st in sampler.states if t >= t_load and sum(st.values()) > settings["min_replicas"]), None)
    changes = [sampler.states[0]] if sampler.states else []
    for entry in sampler.states[1:]:
        if entry[1] != changes[-1][1]:
            changes.append(entry)
    serve.delete(app_name)
    return {
        "settings": settings,
        "load": load,
        "replicas_before_load": before,
        "replicas_peak_under_load": peak,
        "replicas_after_idle": samples[-1][1] if samples else None,
        "upscale_decided_after_s": round(decided_at - t_load, 2) if decided_at is not None else None,
        "added_replica_running_after_s": round(upscaled_at - t_load, 2) if upscaled_at is not None else None,
        "removed_replica_after_idle_s": round(scaled_down_at - t_idle, 2) if scaled_down_at else None,
        "scaled_up": peak > settings["min_replicas"],
        "scaled_down": scaled_down_at is not None,
        "load_started_at_s": round(t_load, 2),
        "idle_started_at_s": round(t_idle, 2),
        "replica_state_changes": changes,
    }


# -- overload: bounded queues, goodput, 503s --

UNBOUNDED = {"max_ongoing_requests": 64, "max_queued_requests": -1, "ingress_max_ongoing_requests": 256,
             "ingress_max_queued_requests": -1, "ingress_max_accepted_images": 1_000_000,
             "request_timeout_s": 3600.0}  # the queues as they were before: nothing is turned away


def train_small_models(images_dir: Path, out: Path) -> str:
    """C-Net, identity and expression bundles trained for a few epochs on Yale coefficients (as
    tests/test_serve.py's fixture does, written locally): /v1/predict needs models, the load
    test needs their cost, not their accuracy."""
    import torch

    from facedist.datasets import parse_yale_name
    from facedist.extractors import make_extractor
    from facedist.images import decode_image
    from facedist.extraction.rows import extract_rows
    from facedist.schema import YALE_EXPRESSIONS, rows_to_table
    from facedist.training import TrainConfig, train_and_save
    from facedist.training.data import table_to_data

    torch.manual_seed(0)
    extractor = make_extractor("tddfa")
    rows = []
    for path in sorted(p for p in images_dir.iterdir() if p.name.split(".")[-1] in YALE_EXPRESSIONS):
        labels = parse_yale_name(path.name) or {}
        rows.append({"path": path.name, "subject": labels.get("subject"), "expression": labels.get("expression"),
                     "image": decode_image(path.read_bytes())})
    finished, _ = extract_rows(rows, extractor)
    data = table_to_data(rows_to_table(finished, extractor.layout))
    for cfg in (TrainConfig(task="cnet", epochs=2, steps_per_epoch=3, batch_size=16),
                TrainConfig(task="identity", epochs=6, batch_size=32, cnet=str(out / "cnet"), aggregate="cnet",
                            max_combos_per_subject=20),
                TrainConfig(task="expression", epochs=4, batch_size=32, labels=list(YALE_EXPRESSIONS))):
        train_and_save(cfg, data, str(out / cfg.task))
    return str(out)


def _ms(values: list[float]) -> dict:
    lat = np.asarray(values) * 1000.0
    if not lat.size:
        return {"n": 0, "p50": None, "p99": None}
    return {"n": int(lat.size), "p50": round(float(np.percentile(lat, 50)), 1),
            "p99": round(float(np.percentile(lat, 99)), 1)}


def multipart_body(files) -> tuple[bytes, str]:
    """One multipart/form-data body, encoded once: `files` as httpx takes them (a dict of field ->
    (name, bytes), or a list of (field, (name, bytes))). The load client then sends bytes, so its
    own CPU goes to HTTP, not to encoding the same upload again for every request."""
    boundary = "facedist-load-" + os.urandom(8).hex()
    parts = []
    for field, (name, data) in (files.items() if isinstance(files, dict) else files):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def overload_level(url: str, bodies, concurrency: int, max_requests: int, max_seconds: float,
                         retry: str, client_timeout_s: float, settle_s: float = 10.0,
                         spawn_per_s: float | None = None) -> dict:
    """`concurrency` closed-loop clients; every request's outcome is counted: an HTTP status, or
    the client-side error that ended it (a timeout, a reset connection). Clients join at
    `spawn_per_s` (None: all at once), as a load tool's spawn rate ramps users up.

    The client is aiohttp (its C HTTP parser) with the uploads encoded once: on these 2 cores it
    shares the CPUs with the server, and httpx's per-request cost took a share that grew with
    every 503 it had to read."""
    import random

    import aiohttp

    encoded = [multipart_body(files) for files in bodies]
    by_status: dict[str, list[float]] = {}
    timeline: list[tuple[float, str, float]] = []  # (sent at, outcome, latency), seconds
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}  # the first body of each kind of error
    issued = 0
    waited_s = 0.0
    deadline = time.perf_counter() + max_seconds
    rng = random.Random(concurrency)
    started = time.perf_counter()

    async def client(worker: int, session: aiohttp.ClientSession):
        nonlocal issued, waited_s
        if spawn_per_s:
            await asyncio.sleep(worker / spawn_per_s)
        while issued < max_requests and time.perf_counter() < deadline:
            body, content_type = encoded[(issued + worker) % len(encoded)]
            issued += 1
            start = time.perf_counter()
            retry_after = None
            try:
                async with session.post(url, data=body, headers={"Content-Type": content_type}) as response:
                    text = await response.read()
                    outcome = str(response.status)
                    retry_after = response.headers.get("Retry-After")
                if response.status >= 400:  # which error: the API's code, else Serve's own text
                    try:
                        code = json.loads(text)["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "not-the-api's-json"
                    errors[f"{outcome} {code}"] = errors.get(f"{outcome} {code}", 0) + 1
                    samples.setdefault(f"{outcome} {code}", text[:200].decode(errors="replace"))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                outcome = type(exc).__name__
            by_status.setdefault(outcome, []).append(time.perf_counter() - start)
            timeline.append((start - started, outcome, time.perf_counter() - start))
            if outcome == "503" and retry == "honor" and retry_after and retry_after.isdigit():
                pause = min(int(retry_after) * rng.uniform(0.5, 1.5), max(0.0, deadline - time.perf_counter()))
                waited_s += pause
                await asyncio.sleep(pause)

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=client_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(w, session) for w in range(concurrency)))
        wall = time.perf_counter() - started
    counts = {k: len(v) for k, v in sorted(by_status.items())}
    # The steady state: after the first `settle_s` (the clients joining: the burst) and before the
    # last request was sent (then the clients stop and the server drains what it holds, longer
    # the more it holds). Goodput there is the 2xx answers that arrived inside that window over its
    # length; latencies are those of the requests sent inside it.
    last_sent = max((sent for sent, _, _ in timeline), default=0.0)
    steady = [(o, t) for sent, o, t in timeline if settle_s <= sent <= last_sent]
    window_s = last_sent - settle_s
    steady_ok = sum(o.startswith("2") and settle_s <= sent + t <= last_sent for sent, o, t in timeline)
    ok = sum(n for k, n in counts.items() if k.startswith("2"))
    answered = sum(n for k, n in counts.items() if k.isdigit())
    return {
        "concurrency": concurrency, "issued": issued, "answered": answered, "outcomes": counts,
        "spawn_per_s": spawn_per_s, "error_codes": errors, "error_samples": samples,
        "wall_s": round(wall, 2),
        "goodput_per_s": round(ok / wall, 2) if wall else None,
        "share_503": round(counts.get("503", 0) / issued, 3) if issued else None,
        "latency_ms_2xx": _ms([t for k, v in by_status.items() if k.startswith("2") for t in v]),
        "latency_ms_503": _ms(by_status.get("503", [])),
        "latency_ms_504": _ms(by_status.get("504", [])),
        "client_wait_after_503_s": round(waited_s, 1),
        "steady": {
            "after_s": settle_s, "until_s": round(last_sent, 2), "requests": len(steady),
            "goodput_per_s": round(steady_ok / window_s, 2) if window_s > 0 else None,
            "latency_ms_2xx": _ms([t for o, t in steady if o.startswith("2")]),
            "latency_ms_503": _ms([t for o, t in steady if o == "503"])},
        "per_second": _per_second(timeline),
    }


def _per_second(timeline) -> list[dict]:
    """Requests by the second they were sent in: count by outcome and the slowest answer (ms)."""
    seconds: dict[int, dict] = {}
    for sent, outcome, latency in timeline:
        entry = seconds.setdefault(int(sent), {"t": int(sent), "outcomes": {}, "max_ms": 0.0})
        entry["outcomes"][outcome] = entry["outcomes"].get(outcome, 0) + 1
        entry["max_ms"] = max(entry["max_ms"], round(latency * 1000, 1))
    return [seconds[k] for k in sorted(seconds)]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def overload_levels(app_name: str, url: str, bodies, levels, args) -> dict:
    results = []
    with ReplicaSampler(app_name, period_s=1.0, all_deployments=True) as sampler:
        for concurrency in levels:
            before = load_average()
            t0 = round(time.perf_counter() - sampler.t0, 1)
            result = asyncio.run(overload_level(url, bodies, concurrency, args.overload_requests * max(1, concurrency // 8)
                                                if concurrency > 8 else args.overload_requests,
                                                args.max_seconds, args.retry, args.client_timeout_s,
                                                spawn_per_s=args.spawn_per_s))
            result["load_average_before"] = before
            result["load_average_after"] = load_average()
            result["t_start_s"], result["t_end_s"] = t0, round(time.perf_counter() - sampler.t0, 1)
            results.append(result)
            print(f"[{app_name} {url.rsplit('/', 1)[-1]}] c={concurrency}: goodput {result['goodput_per_s']}/s, "
                  f"503 share {result['share_503']}, 2xx p50/p99 {result['latency_ms_2xx']['p50']}/"
                  f"{result['latency_ms_2xx']['p99']} ms, 503 p99 {result['latency_ms_503']['p99']} ms, "
                  f"outcomes {result['outcomes']}, load {result['load_average_after']}", flush=True)
    return {"levels": results, "replicas_over_time": _changes(sampler.deployments)}


def _changes(samples: list[tuple[float, dict]]) -> list:
    """The samples where the replica counts changed (and the first and last)."""
    kept = [s for i, s in enumerate(samples) if i == 0 or s[1] != samples[i - 1][1]]
    return kept + ([samples[-1]] if samples and kept[-1] is not samples[-1] else [])


def overload_checks(levels: list[dict]) -> dict:
    """The issue's figures, as ratios within this run: over each whole level, and over its
    steady part (after the first seconds, when every client has started at once)."""
    def checks(view) -> dict:
        by_c = {level["concurrency"]: view(level) for level in levels}
        top = max(by_c)
        best_lower = max((v["goodput_per_s"] or 0) for c, v in by_c.items() if c < top)
        out = {"goodput_top_over_best_lower": round(by_c[top]["goodput_per_s"] / best_lower, 3)
               if best_lower and by_c[top]["goodput_per_s"] is not None else None}
        if 32 in by_c and by_c[32]["latency_ms_2xx"]["p99"] and by_c[top]["latency_ms_2xx"]["p99"]:
            out["p99_2xx_top_over_c32"] = round(by_c[top]["latency_ms_2xx"]["p99"] / by_c[32]["latency_ms_2xx"]["p99"], 3)
        p99_503 = [v["latency_ms_503"]["p99"] for v in by_c.values() if v["latency_ms_503"]["p99"] is not None]
        out["max_p99_503_ms"] = max(p99_503) if p99_503 else None
        return out

    return {"every_request_answered": all(level["answered"] == level["issued"] for level in levels),
            "whole_level": checks(lambda level: level), "steady": checks(lambda level: level["steady"])}


def autoscaling_step(port: int, base: dict, bodies, args) -> dict:
    """A load step on an extractor that may scale 1 -> 2 replicas (half a CPU each, so Ray can
    place the second on these cores), with the default upscale/downscale delays: the replica
    count sampled every 0.5 s through the step and the idle time after it; `changes` counts how
    often it moved (one up and, after downscale_delay_s of idle, one down is no oscillation)."""
    from ray import serve

    app_name = "bench-step"
    settings = {**base, "extractor_num_cpus": 0.5, "min_replicas": 1, "max_replicas": 2}
    url = deploy(app_name, settings, port)
    asyncio.run(overload_level(url, bodies, 2, args.warmup, 120, "honor", args.client_timeout_s))
    with ReplicaSampler(app_name, all_deployments=True) as sampler:
        t_load = time.perf_counter() - sampler.t0
        load = asyncio.run(overload_level(url, bodies, args.step_clients, 1_000_000, args.step_load_s, args.retry,
                                          args.client_timeout_s))
        t_idle = time.perf_counter() - sampler.t0
        time.sleep(args.step_idle_s)
    counts = [n for _, n in sampler.samples]
    changes = sum(1 for a, b in zip(counts, counts[1:]) if a != b)
    serve.delete(app_name)
    from facedist.serving.settings import ServeSettings

    defaults = ServeSettings()
    return {"settings": {**settings, "upscale_delay_s": defaults.upscale_delay_s,
                         "downscale_delay_s": defaults.downscale_delay_s,
                         "look_back_period_s": defaults.look_back_period_s},
            "clients": args.step_clients, "load": load, "load_started_at_s": round(t_load, 1),
            "idle_started_at_s": round(t_idle, 1), "replicas_over_time": _changes(sampler.deployments),
            "replica_count_changes": changes, "peak_replicas": max(counts) if counts else None,
            "load_average_after": load_average()}


def overload_main(args) -> dict:
    import tempfile

    import ray
    from ray import serve

    from facedist.serving.settings import ServeSettings

    os.environ.pop("FACEDIST_API_TOKEN", None)
    images = load_images(args.data, 32)
    extract_bodies = [{"image": (name, data)} for name, data in images]
    people: dict[str, list[tuple[str, bytes]]] = {}
    for path in sorted(args.data.iterdir()):
        if path.name.startswith("subject"):
            people.setdefault(path.name.split(".")[0], []).append((path.name, path.read_bytes()))
    predict_bodies = [[("images", item) for item in photos[:3]] for photos in people.values()]
    levels = [int(c) for c in args.levels.split(",")]
    started = time.perf_counter()
    models = train_small_models(args.data, Path(tempfile.mkdtemp(prefix="facedist-bench-models-")))
    # What `facedist serve` starts: a local Ray with the machine's CPUs (at least 2).
    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                       "FACEDIST_MODEL_DIR": os.environ["FACEDIST_MODEL_DIR"]}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"backend": "tddfa", "models_uri": models}
    resolved = ServeSettings.from_args(base).resolved(ray.cluster_resources().get("CPU"))
    report = {"benchmark": "serve_overload",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "ray": ray.__version__},
              "load_average_at_start": load_average(),
              "client": f"closed loop, aiohttp on loopback, uploads encoded once, in this process; clients "
                        f"join at {args.spawn_per_s or 'once'}/s; after a 503: {args.retry} "
                        "(honor: wait Retry-After x0.5-1.5)",
              "limits_per_level": {"max_requests": f"{args.overload_requests} (x c/8 above 8 clients)",
                                   "max_seconds": args.max_seconds, "client_timeout_s": args.client_timeout_s},
              "settings": {k: v for k, v in dataclasses.asdict(resolved).items()
                           if "request" in k or "replicas" in k or k in ("retry_after_s", "extractor_num_cpus")}}
    try:
        app = "bench-bounded"
        deploy(app, base, port)
        extract_url, predict_url = (f"http://127.0.0.1:{port}/v1/{e}" for e in ("extract", "predict"))
        asyncio.run(overload_level(extract_url, extract_bodies, 2, args.warmup, 120, "honor", args.client_timeout_s))
        asyncio.run(overload_level(predict_url, predict_bodies, 2, args.warmup, 120, "honor", args.client_timeout_s))
        report["extract"] = overload_levels(app, extract_url, extract_bodies, levels, args)
        report["extract"]["checks"] = overload_checks(report["extract"]["levels"])
        if args.spawn_per_s:
            # The same top level with every client sending its first request at once (a herd):
            # how long the front end takes to turn that burst away.
            herd = asyncio.run(overload_level(extract_url, extract_bodies, levels[-1],
                                              args.overload_requests * max(1, levels[-1] // 8), args.max_seconds,
                                              args.retry, args.client_timeout_s))
            report["extract"]["herd"] = herd
            print(f"[herd extract] c={levels[-1]} at once: goodput {herd['goodput_per_s']}/s, 503 p99 "
                  f"{herd['latency_ms_503']['p99']} ms (steady {herd['steady']['latency_ms_503']['p99']} ms)", flush=True)
        report["predict"] = overload_levels(app, predict_url, predict_bodies, levels, args)
        report["predict"]["checks"] = overload_checks(report["predict"]["levels"])
        serve.delete(app)
        if not args.skip_baseline:
            app = "bench-unbounded"
            deploy(app, {**base, **UNBOUNDED}, port)
            asyncio.run(overload_level(extract_url, extract_bodies, 2, args.warmup, 120, "honor", args.client_timeout_s))
            baseline_levels = [c for c in (32, levels[-1]) if c in levels]
            report["unbounded_baseline"] = {"settings": UNBOUNDED,
                                            **overload_levels(app, extract_url, extract_bodies, baseline_levels, args)}
            serve.delete(app)
            bounded = {lv["concurrency"]: lv for lv in report["extract"]["levels"]}
            report["bounded_over_unbounded_goodput"] = {
                str(lv["concurrency"]): round(bounded[lv["concurrency"]]["goodput_per_s"] / lv["goodput_per_s"], 3)
                for lv in report["unbounded_baseline"]["levels"] if lv["goodput_per_s"]}
        if not args.skip_autoscaling:
            report["autoscaling_step"] = autoscaling_step(port, base, extract_bodies, args)
            step = report["autoscaling_step"]
            print(f"[step] peak {step['peak_replicas']} replicas, {step['replica_count_changes']} changes", flush=True)
    finally:
        report["total_s"] = round(time.perf_counter() - started, 1)
        report["load_average_at_end"] = load_average()
        serve.shutdown()
        ray.shutdown()
    args.overload_out.parent.mkdir(parents=True, exist_ok=True)
    args.overload_out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k]["checks"] for k in ("extract", "predict")}, indent=2))
    return report


def main(argv=None) -> dict:
    from facedist.serving.settings import ServeSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "yalefaces")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_load.json")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--batch-size", type=int, default=ServeSettings.max_batch_size)
    parser.add_argument("--requests-per-client", type=int, default=10)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit per level")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--autoscale-load-s", type=float, default=30.0)
    parser.add_argument("--autoscale-idle-s", type=float, default=60.0)
    parser.add_argument("--skip-autoscaling", action="store_true")
    parser.add_argument("--detect-threads", type=int, default=os.cpu_count(),
                        help="dlib HOG detection threads per extractor replica, the same in every phase")
    parser.add_argument("--detectors", default="faceboxes,dlib", help="face detectors to compare")
    parser.add_argument("--extractor-cpus", type=float, default=1.0,
                        help="CPUs per extractor replica (rounded: its torch threads) in the throughput phases")
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    overload = parser.add_argument_group("--overload")
    overload.add_argument("--overload", action="store_true",
                          help="the overload test instead (bounded queues; see the docstring)")
    overload.add_argument("--overload-out", type=Path,
                          default=REPO / "benchmarks" / "results" / "serve_overload.json")
    overload.add_argument("--overload-requests", type=int, default=1000,
                          help="request cap per level (x c/8 above 8 clients); --max-seconds caps its time")
    overload.add_argument("--retry", choices=("honor", "immediate"), default="honor",
                          help="after a 503: wait its Retry-After (jittered), or send the next request at once")
    overload.add_argument("--client-timeout-s", type=float, default=120.0)
    overload.add_argument("--spawn-per-s", type=float, default=32.0,
                          help="clients join at this rate, a load tool's spawn rate (0: all at once); the "
                               "top level is also run with all at once (the herd)")
    overload.add_argument("--skip-baseline", action="store_true", help="no unbounded-queue baseline")
    overload.add_argument("--step-clients", type=int, default=64)
    overload.add_argument("--step-load-s", type=float, default=40.0)
    overload.add_argument("--step-idle-s", type=float, default=110.0,
                          help="idle after the step: longer than look_back_period_s + downscale_delay_s, "
                               "to see the scale-down")
    args = parser.parse_args(argv)
    if args.overload and "--levels" not in (argv or sys.argv):
        args.levels = "1,8,32,128,256"
    if args.overload and "--max-seconds" not in (argv or sys.argv):
        args.max_seconds = 30.0
    if args.quick:
        args.requests_per_client, args.min_requests, args.max_seconds = 1, 8, 8.0 if args.overload else 20.0
        args.autoscale_load_s, args.autoscale_idle_s = 15.0, 30.0
        args.overload_requests, args.step_load_s, args.step_idle_s = 40, 10.0, 10.0
    if args.overload:
        os.environ.setdefault("FACEDIST_MODEL_DIR", str(REPO.parent / "shared" / "models"))
        return overload_main(args)

    import ray
    from ray import serve

    os.environ.setdefault("FACEDIST_MODEL_DIR", str(REPO.parent / "shared" / "models"))
    os.environ.pop("FACEDIST_API_TOKEN", None)  # the benchmark measures the models, not auth
    images = load_images(args.data, 32)
    levels = [int(c) for c in args.levels.split(",")]
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    single = {d: single_process_rate(images, d) for d in detectors}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                       "FACEDIST_MODEL_DIR": os.environ["FACEDIST_MODEL_DIR"]}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    headers: dict = {}
    started = time.perf_counter()
    # Identical deployments except max_batch_size. A batch's images are detected on the replica's
    # detect_threads; with max_batch_size=1 each request is a batch of one, so that parallelism is
    # what batching buys on CPU (with the regressor's batched forward).
    # The serve settings' defaults (batch wait included) except for what the flags set.
    base = {"backend": "tddfa", "detect_threads": args.detect_threads,
            "extractor_num_cpus": args.extractor_cpus}
    report = {
        "benchmark": "serve_load",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__},
        "images": f"{len(images)} Yale photos (320x243 GIF), cycled",
        "client": "closed loop, asyncio httpx on loopback",
        "single_process": single,
    }
    try:
        report["no_model_ceiling"] = no_model_ceiling(port, images, levels, args)
        top_ceiling = report["no_model_ceiling"]["levels"][-1]["requests_per_s"]
        report["no_model_ceiling"][f"c{levels[-1]}_over_single_process"] = {
            d: round(top_ceiling / single[d]["images_per_s"], 3) for d in detectors}
        for detector in detectors:
            settings = {**base, "detector": detector}
            batched = throughput_phase(f"{detector}-batched", {**settings, "max_batch_size": args.batch_size},
                                       port, images, levels, args, headers)
            unbatched = throughput_phase(f"{detector}-unbatched", {**settings, "max_batch_size": 1},
                                         port, images, levels, args, headers)
            ratios = {}
            for b, u in zip(batched["levels"], unbatched["levels"]):
                if b["requests_per_s"] and u["requests_per_s"]:
                    ratios[str(b["concurrency"])] = round(b["requests_per_s"] / u["requests_per_s"], 2)
            top = batched["levels"][-1]["requests_per_s"] or 0.0
            report[detector] = {
                "batched": batched, "unbatched": unbatched, "throughput_ratio_batched_over_unbatched": ratios,
                # Serve at the highest concurrency against one plain process on the same cores.
                f"batched_c{levels[-1]}_over_single_process": round(top / single[detector]["images_per_s"], 3)}
        if len(detectors) > 1:
            first, other = detectors[:2]
            report[f"{first}_over_{other}_batched"] = {
                str(a["concurrency"]): round(a["requests_per_s"] / b["requests_per_s"], 2)
                for a, b in zip(report[first]["batched"]["levels"], report[other]["batched"]["levels"])
                if a["requests_per_s"] and b["requests_per_s"]}
        if not args.skip_autoscaling:
            # Half a CPU per replica, so a second one fits beside the first on 2 cores.
            autoscale = {**base, "detector": detectors[0], "max_batch_size": args.batch_size,
                         "extractor_num_cpus": 0.5, "min_replicas": 1, "max_replicas": 2,
                         "target_ongoing_requests": 4, "upscale_delay_s": 1.0, "downscale_delay_s": 5.0,
                         "look_back_period_s": 3.0}
            report["autoscaling"] = autoscaling_phase(autoscale, port, images, args, headers)
            a = report["autoscaling"]
            print(f"[autoscaling] replicas {a['replicas_before_load']} -> {a['replicas_peak_under_load']} "
                  f"under load -> {a['replicas_after_idle']} after idle", flush=True)
    finally:
        report["total_s"] = round(time.perf_counter() - started, 1)
        serve.shutdown()
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k.endswith("_batched") or k == "total_s"}, indent=2))
    return report


if __name__ == "__main__":
    main()
