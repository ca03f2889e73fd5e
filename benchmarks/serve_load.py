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
     batched (max_batch_size=16) and unbatched (max_batch_size=1) at concurrency 1, 8, 32
  2. autoscaling (min 1, max 2 replicas, short delays, the first detector): load at concurrency
     32, then idle; the extractor's replica count is sampled from serve.status() throughout.
Each level is bounded by a request count and a time limit. Clients are asyncio httpx
coroutines, each sending its next request when the previous answer arrives (closed loop).
Output: JSON (requests/s, p50/p99 latency, errors, replicas observed) to
benchmarks/results/serve_load.json and stdout.
"""

import argparse
import asyncio
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


def running_replicas(app_name: str) -> int:
    return replica_states(app_name).get("RUNNING", 0)


class ReplicaSampler:
    """Samples the extractor's RUNNING replica count in a background thread."""

    def __init__(self, app_name: str, period_s: float = 0.5):
        self.app_name, self.period_s = app_name, period_s
        self.samples: list[tuple[float, int]] = []           # (t, RUNNING replicas)
        self.states: list[tuple[float, dict]] = []           # (t, replicas by state)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _run(self):
        while not self._stop.is_set():
            try:
                states = replica_states(self.app_name)
                self.samples.append((round(time.perf_counter() - self.t0, 2), states.get("RUNNING", 0)))
                self.states.append((round(time.perf_counter() - self.t0, 2), states))
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "yalefaces")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_load.json")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--batch-size", type=int, default=16)
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
    args = parser.parse_args(argv)
    if args.quick:
        args.requests_per_client, args.min_requests, args.max_seconds = 1, 8, 20.0
        args.autoscale_load_s, args.autoscale_idle_s = 15.0, 30.0

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
