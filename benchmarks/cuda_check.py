"""The torch parts on a GPU: do they run there, agree with the CPU, and how fast are they?

Needs torch with CUDA, pyarrow, opencv and pillow; not Ray or dlib (the table's images and face
boxes are the inputs):
  1. tddfa extraction on CUDA vs CPU from the same boxes: largest coefficient difference;
  2. FaceBoxes on CUDA: boxes against the CPU's on the same images, images/s by batch size (the
     table's photos, and the same photos at 640x480), and the whole default extraction (FaceBoxes
     + tddfa, no table boxes) on CUDA vs CPU;
  3. the tddfa regressor and the Deep3D R-Net (random weights): images/s by batch size, which is
     what Serve's batching buys on a GPU;
  4. training seconds per input on CUDA: 1-D ResNet-34 on identity coefficients vs the 2-D
     ResNet-34 image baseline at 112 px, and C-Net, all through training.engine.fit.
Each part records its error instead of stopping the rest. JSON out.

    FACEDIST_MODEL_DIR=../shared/models python benchmarks/cuda_check.py --table yale_tddfa.parquet
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class TableDetector:
    """Face boxes looked up by image content, from an extracted table."""

    name = version = "table"

    def __init__(self, by_hash: dict):
        self.by_hash = by_hash

    def detect_batch(self, images) -> list[list]:
        from facedist.detection import FaceBox

        found = [self.by_hash.get(hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest()) for im in images]
        return [[FaceBox(box=box, score=1.0)] if box is not None else [] for box in found]


def _images_and_detector(table_path: str, limit: int):
    import pyarrow.parquet as pq

    from facedist import storage
    from facedist.images import as_rgb_uint8, decode_image

    rows = [r for r in pq.read_table(table_path).to_pylist() if r["status"] == "ok"][:limit]
    images, by_hash = [], {}
    for row in rows:
        rgb = as_rgb_uint8(decode_image(storage.read_bytes(row["path"])))
        by_hash[hashlib.sha1(rgb.tobytes()).hexdigest()] = np.asarray(row["box"], np.float32)
        images.append(rgb)
    return images, TableDetector(by_hash)


def _timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats


def check_extraction(table: str, limit: int, device: str) -> dict:
    from facedist.extractors import make_extractor

    images, detector = _images_and_detector(table, limit)
    results = {}
    for name, where in (("cpu", "cpu"), ("gpu", device)):
        extractor = make_extractor("tddfa", detector=detector, device=where)
        extractor.extract(images[:8])  # warm-up: CUDA context, cuDNN algorithm choice
        started = time.perf_counter()
        results[name] = extractor.extract(images)
        results[name + "_seconds"] = time.perf_counter() - started
    # For comparison: the same on the GPU with TF32 convolutions allowed (what the extractors turn off).
    import facedist.extractors.tddfa as tddfa_module

    real = tddfa_module.full_precision
    tddfa_module.full_precision = contextlib.nullcontext
    try:
        tf32 = make_extractor("tddfa", detector=detector, device=device).extract(images)
    finally:
        tddfa_module.full_precision = real
    cpu, gpu = results["cpu"], results["gpu"]
    statuses_equal = [a.status for a in cpu] == [b.status for b in gpu]
    ok = [(a, b) for a, b in zip(cpu, gpu) if a.ok and b.ok]

    def relative(field, other=gpu):  # largest difference over the coefficient's spread across images
        pairs = [(x, y) for x, y in zip(cpu, other) if x.ok and y.ok]
        a = np.stack([getattr(x, field) for x, _ in pairs])
        b = np.stack([getattr(y, field) for _, y in pairs])
        return float((np.abs(a - b) / np.maximum(a.std(0), 1e-12)).max())

    return {
        "images": len(images), "ok_cpu": sum(r.ok for r in cpu), "ok_cuda": sum(r.ok for r in gpu),
        "statuses_equal": statuses_equal,
        "max_abs_diff_id": float(max(np.abs(a.id_coeffs - b.id_coeffs).max() for a, b in ok)),
        "max_abs_diff_exp": float(max(np.abs(a.exp_coeffs - b.exp_coeffs).max() for a, b in ok)),
        "max_diff_id_over_std": relative("id_coeffs"), "max_diff_exp_over_std": relative("exp_coeffs"),
        "tf32_max_diff_id_over_std": relative("id_coeffs", tf32),
        "max_abs_diff_landmarks_px": float(max(np.abs(a.landmarks_fit - b.landmarks_fit).max() for a, b in ok)),
        "mean_landmark_error_cuda": float(np.mean([b.landmark_error for _, b in ok])),
        "seconds_cpu": round(results["cpu_seconds"], 3), "seconds_cuda": round(results["gpu_seconds"], 3),
    }


def check_faceboxes(table: str, limit: int, device: str, batches=(1, 8, 32, 128), repeats: int = 10) -> dict:
    import cv2
    import torch

    from facedist.detection import FaceBoxesDetector
    from facedist.extractors import make_extractor

    images, _ = _images_and_detector(table, limit)
    cpu, gpu = FaceBoxesDetector("cpu"), FaceBoxesDetector(device)
    on_cpu, on_gpu = cpu.detect_batch(images), gpu.detect_batch(images)
    same_count = [len(a) for a in on_cpu] == [len(b) for b in on_gpu]
    box_diff = max((float(np.abs(a[0].box - b[0].box).max()) for a, b in zip(on_cpu, on_gpu) if a and b), default=None)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    rates = {}
    for label, batch_images in (("table_size", images), ("640x480", [cv2.resize(im, (640, 480)) for im in images])):
        rows = {}
        for batch in batches:
            chunk = (batch_images * (batch // len(batch_images) + 1))[:batch]
            gpu.max_batch = batch
            seconds = _timed(lambda: gpu.detect_batch(chunk), repeats, sync)
            rows[str(batch)] = round(batch / seconds, 1)
        rows["batched_over_batch1"] = round(rows[str(batches[-1])] / rows["1"], 1)
        rates[label] = rows
    # the default extraction end to end (FaceBoxes + tddfa) on both devices
    ends = {}
    for name, where in (("cpu", "cpu"), ("gpu", device)):
        extractor = make_extractor("tddfa", device=where)
        extractor.extract(images[:8])
        started = time.perf_counter()
        ends[name] = extractor.extract(images)
        ends[name + "_seconds"] = time.perf_counter() - started
    pairs = [(a, b) for a, b in zip(ends["cpu"], ends["gpu"]) if a.ok and b.ok]
    return {"images": len(images), "faces_cpu": sum(bool(f) for f in on_cpu), "faces_cuda": sum(bool(f) for f in on_gpu),
            "same_face_counts": same_count, "max_abs_diff_top_box_px": box_diff, "images_per_s": rates,
            "extraction_statuses_equal": [a.status for a in ends["cpu"]] == [b.status for b in ends["gpu"]],
            "extraction_max_abs_diff_id": float(max(np.abs(a.id_coeffs - b.id_coeffs).max() for a, b in pairs)),
            "extraction_images_per_s": {"cpu": round(len(images) / ends["cpu_seconds"], 1),
                                        "cuda": round(len(images) / ends["gpu_seconds"], 1)}}


def check_throughput(device: str, batches=(1, 8, 32, 128), repeats: int = 20) -> dict:
    import torch

    from facedist import assets
    from facedist.models.mobilenet import fuse_for_inference, load_mobilenet
    from facedist.models.resnet import ReconNet

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    nets = {
        "tddfa_mobilenet_120": (fuse_for_inference(load_mobilenet(assets.resolve("tddfa/mb05_120x120.pth"),
                                                                  device=device)), 120),
        "deep3d_rnet_224": (ReconNet().to(device).eval(), 224),
    }
    for name, (net, size) in nets.items():
        rows = {}
        for batch in batches:
            x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
            net = net.to(memory_format=torch.channels_last)
            with torch.inference_mode():
                seconds = _timed(lambda: net(x), repeats, sync)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    seconds_bf16 = _timed(lambda: net(x), repeats, sync)
            rows[str(batch)] = {"images_per_s_fp32": round(batch / seconds, 1),
                                "images_per_s_bf16": round(batch / seconds_bf16, 1)}
        rows["batched_over_batch1_fp32"] = round(rows[str(batches[-1])]["images_per_s_fp32"]
                                                 / rows["1"]["images_per_s_fp32"], 1)
        out[name] = rows
    return out


def check_training(table: str, epochs: int, device: str) -> dict:
    from dataclasses import replace

    from facedist.training.data import load_data
    from facedist.training.engine import TrainConfig, fit
    from facedist.training.image_baseline import load_crops, make_image_task
    from facedist.training.tasks import CNetTask, make_classifier_task

    data = load_data(table)
    crops = load_crops(data, 112)
    base = TrainConfig(task="identity", epochs=epochs, batch_size=32, aggregate="mean", image_size=112,
                       patience=100, warmup_epochs=0)
    cnet_cfg = TrainConfig(task="cnet", epochs=epochs, lr=3e-3, batch_size=16, set_size=6, steps_per_epoch=10,
                           patience=100)

    def classifier(cfg):
        task = make_image_task(cfg, data, crops) if cfg.task.startswith("image_") else make_classifier_task(cfg, data)
        result = fit(task, cfg, device=device)
        per_input = [h["seconds_per_input"] for h in result.history[1:]]
        return {"s_per_input": float(np.mean(per_input)), "accuracy": result.best_metrics["accuracy"]}

    def cnet():
        result = fit(CNetTask(cnet_cfg, data), cnet_cfg, device=device)
        return {k: result.best_metrics[k] for k in ("loo_error_cnet", "loo_error_mean")}

    def ddp():  # engine.fit under DistributedDataParallel, metrics all-reduced over NCCL (world size 1)
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
        try:
            ids = [0] if device == "cuda" else None
            result = fit(make_classifier_task(base, data), base, device=device,
                         wrap_model=lambda m: DistributedDataParallel(m, device_ids=ids))
            return {"backend": backend, "accuracy": result.best_metrics["accuracy"],
                    "epochs": len(result.history)}
        finally:
            dist.destroy_process_group()

    out = {}
    for name, run in (("coefficients_identity", lambda: classifier(base)),
                      ("images_identity", lambda: classifier(replace(base, task="image_identity"))),
                      ("cnet", cnet), ("ddp", ddp)):
        try:
            out[name] = run()
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    if "error" not in out["coefficients_identity"] and "error" not in out["images_identity"]:
        out["speedup_coefficients_vs_images"] = (out["images_identity"]["s_per_input"]
                                                 / out["coefficients_identity"]["s_per_input"])
    if any("error" in v for v in out.values() if isinstance(v, dict)):
        out["error"] = "a training part failed (see its entry)"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", required=True, help="an extracted tddfa coefficients table")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cuda_check.json")
    parser.add_argument("--device", default=None, help="default: cuda when present (cpu: a dry run)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    report = {"benchmark": "cuda_check", "torch": torch.__version__, "python": platform.python_version(),
              "cuda": torch.cuda.is_available(), "device": device,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    parts = (("extraction", lambda: check_extraction(args.table, args.images, device)),
             ("faceboxes", lambda: check_faceboxes(args.table, args.images, device)),
             ("throughput", lambda: check_throughput(device, repeats=args.repeats)),
             ("training", lambda: check_training(args.table, args.epochs, device)))
    for name, run in parts:
        started = time.perf_counter()
        try:
            report[name] = run()
        except Exception as exc:  # keep going: one report shows every part's state
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        report[name]["wall_s"] = round(time.perf_counter() - started, 1)
        print(f"[{name}] {json.dumps(report[name])[:600]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0 if all("error" not in report[name] for name, _ in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
