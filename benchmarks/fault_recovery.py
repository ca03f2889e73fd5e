"""Figures for lost nodes and a flaky object store (the scenarios of tests/test_node_loss.py and
tests/test_flaky_store.py, timed): recovery time after a worker node is killed during extraction,
training and serving, on a 3-node Ray cluster on this machine; retries per 1,000 S3 requests at
10% injected faults; rows lost (must be 0).

    PYTHONPATH=. FACEDIST_MODEL_DIR=../shared/models python benchmarks/fault_recovery.py \
        [--images ../shared/data/yalefaces] [--out benchmarks/results/fault_recovery.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support.faultproxy import FaultProxy  # noqa: E402  (test infrastructure, reused here)
from support.multinode import MultiNodeCluster, wait_until  # noqa: E402

from facedist import storage  # noqa: E402
from facedist.extraction.config import ExtractConfig  # noqa: E402
from facedist.extraction.output import list_parts  # noqa: E402


def _copies(images: Path, folder: Path, count: int, distinct: int) -> list[str]:
    originals = sorted(p for p in images.iterdir() if p.name.startswith("subject"))[:distinct]
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}-{originals[i % distinct].name}"
        os.link(originals[i % distinct], path)
        paths.append(str(path))
    return paths


def _rows(out: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.ParquetDataset(list_parts(out)).read(columns=["path"]).column("path").to_pylist()


def extraction(cluster: MultiNodeCluster, paths: list[str], work: Path) -> dict:
    from facedist.extraction.distributed import RayExtractConfig, run_ray_extraction

    config = RayExtractConfig(extract=ExtractConfig(backend="tddfa", batch_size=16), actors=2,
                              actor_num_cpus=0.5, progress=False)
    started = time.monotonic()
    run_ray_extraction(paths, str(work / "clean"), config)
    clean_s = time.monotonic() - started

    out = str(work / "lost")
    done: dict = {}
    started = time.monotonic()
    job = threading.Thread(target=lambda: done.update(summary=run_ray_extraction(paths, out, config)))
    job.start()
    wait_until(lambda: len(list_parts(out)) >= 2, 300, "the first parts")
    _, killed = cluster.kill_node_holding("ExtractActor")
    job.join()
    finished = time.monotonic()
    rows = _rows(out)
    cluster.restore()
    return {"images": len(paths), "clean_run_s": round(clean_s, 2), "run_with_node_loss_s": round(finished - started, 2),
            "extra_s_from_node_loss": round(finished - started - clean_s, 2),
            "kill_to_finish_s": round(finished - killed, 2),
            "rows_out": len(rows), "rows_lost": len(set(paths) - set(rows)), "rows_doubled": len(rows) - len(set(rows))}


def training(cluster: MultiNodeCluster, work: Path) -> dict:
    from facedist.training import TrainConfig, run_training
    from facedist.training.synthetic import SyntheticConfig, synthetic_table

    table, _ = synthetic_table(SyntheticConfig(n_people=8, images_per_person=6, seed=3),
                               expressions=("happy", "sad", "surprised"))
    data = str(work / "train.parquet")
    storage.write_table(table, data)
    epochs = 4

    def config(name):
        return TrainConfig(task="expression", data=data, output=str(work / "train"), epochs=epochs, batch_size=16,
                           num_workers=2, cpus_per_worker=0.5, use_gpu=False, patience=50, name=name,
                           keep_checkpoints=epochs)

    started = time.monotonic()
    run_training(config("clean"))
    clean_s = time.monotonic() - started

    run_dir = work / "train" / "lost"
    done: dict = {}
    started = time.monotonic()
    job = threading.Thread(target=lambda: done.update(summary=run_training(config("lost"))))
    job.start()
    wait_until(lambda: (run_dir / "checkpoint_manager_snapshot.json").exists(), 300, "a registered checkpoint")
    _, killed = cluster.kill_node_holding("RayTrainWorker")
    job.join()
    finished = time.monotonic()
    cluster.restore()
    history = done["summary"]["history"]
    return {"epochs": epochs, "epochs_done": len(history), "clean_run_s": round(clean_s, 2),
            "run_with_node_loss_s": round(finished - started, 2),
            "kill_to_finish_s": round(finished - killed, 2),
            "extra_s_from_node_loss": round(finished - started - clean_s, 2)}


def serving(cluster: MultiNodeCluster, images: Path) -> dict:
    import socket

    import httpx
    from ray import serve

    from serve.app import run_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    run_server(None, host="127.0.0.1", port=port, name="fault-bench", blocking=False, num_replicas=2,
               max_replicas_per_node=1, extractor_num_cpus=0.5, max_batch_size=4)
    wait_until(lambda: len(cluster.actor_nodes("FaceExtractor")) == 2, 300, "one replica per node")
    image = (images / "subject01.normal").read_bytes()
    answers: list[tuple[float, int]] = []
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                status = client.post(f"http://127.0.0.1:{port}/v1/extract", files={"image": ("f.jpg", image)}).status_code
                answers.append((time.monotonic(), status))

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    wait_until(lambda: len(answers) >= 20, 300, "answers under load")
    _, killed = cluster.kill_node_holding("FaceExtractor", avoid=("FacedistAPI",))
    cluster.restore()  # the autoscaler's replacement node
    wait_until(lambda: len(cluster.actor_nodes("FaceExtractor")) == 2, 300, "the replica back")
    back = time.monotonic()
    wait_until(lambda: sum(t > back for t, _ in answers) >= 20, 300, "answers after")
    stop.set()
    for client in clients:
        client.join()
    serve.shutdown()
    after = [(t, s) for t, s in answers if t > killed]
    first_ok = min((t for t, s in after if s == 200), default=None)
    return {"requests": len(answers), "requests_after_loss": len(after),
            "statuses_after_loss": {str(s): sum(1 for _, x in after if x == s) for s in sorted({s for _, s in after})},
            "kill_to_first_200_s": round(first_ok - killed, 2) if first_ok else None,
            "kill_to_replica_back_s": round(back - killed, 2)}


def flaky_store(images: Path, work: Path, fault_rate: float) -> dict:
    """A storage workload and an extraction through the fault proxy at fault_rate."""
    import boto3
    from moto.server import ThreadedMotoServer

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    moto = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=moto, region_name="us-east-1").create_bucket(Bucket="bench")
    proxy = FaultProxy(moto, fault_rate=fault_rate, seed=1000).start()
    options = storage.S3Options(endpoint_url=proxy.endpoint)
    try:
        before = storage.stats_snapshot()
        objects = 0
        while proxy.counts["requests"] < 2000:
            storage.write_bytes(f"s3://bench/objects/{objects:05d}", b"x" * 2048, options)
            assert storage.read_bytes(f"s3://bench/objects/{objects:05d}", options) == b"x" * 2048
            objects += 1
        listed = len(storage.list_files("s3://bench/objects", options))
        report = storage.stats_report(storage.stats_since(before))
        requests = proxy.counts["requests"]
        injected = {k: proxy.counts[k] for k in ("503", "500", "reset")}

        from facedist.extraction.local import run_extraction
        from facedist.extraction.rows import discover_records

        names = sorted(p.name for p in images.iterdir() if p.name.startswith("subject"))[:48]
        s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
        for name in names:
            s3.put_object(Bucket="bench", Key=f"raw/{name}", Body=(images / name).read_bytes())
        proxy.counts.clear()
        summary = run_extraction(discover_records("s3://bench/raw/", options=options), "s3://bench/coeffs",
                                 ExtractConfig(backend="tddfa", batch_size=8), options=options)
        rows = storage.read_table("s3://bench/coeffs", options, columns=["path", "status"]).to_pylist()
    finally:
        proxy.stop()
        server.stop()
    return {"fault_rate": fault_rate, "http_requests": requests, "injected": injected,
            "storage_operations": report["operations"], "client_retries": report["retries"],
            "retries_per_1000_requests": round(1000 * report["retries"] / requests, 1),
            "retries_by_error": report["errors"], "gave_up": report["gave_up"],
            "objects_written": objects, "objects_listed": listed,
            "extraction": {"images": len(names), "rows": len(rows), "rows_lost": len(names) - len({r["path"] for r in rows}),
                           "ok": sum(r["status"] == "ok" for r in rows), "storage": summary.get("run", {}).get("storage")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "yalefaces")
    parser.add_argument("--count", type=int, default=320, help="extraction inputs (copies of Yale photos)")
    parser.add_argument("--fault-rate", type=float, default=0.10)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fault_recovery.json")
    args = parser.parse_args()
    result = {"benchmark": "fault_recovery", "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "load_average_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["flaky_store"] = flaky_store(args.images, work, args.fault_rate)
        (work / "copies").mkdir()
        paths = _copies(args.images, work / "copies", args.count, 40)
        cluster = MultiNodeCluster()
        cluster.connect()
        try:
            result["extraction_node_loss"] = extraction(cluster, paths, work)
            result["training_node_loss"] = training(cluster, work)
            result["serving_node_loss"] = serving(cluster, args.images)
        finally:
            cluster.shutdown()
    result["load_average_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
