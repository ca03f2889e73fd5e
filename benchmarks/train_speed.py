"""Training seconds per input: coefficient classifier (1-D ResNet-34 on identity coefficients)
vs the image baseline (2-D ResNet-34 on crops, at each --image-sizes), and Ray Train with 1 vs 2
workers. JSON out.

    python benchmarks/train_speed.py --data /tmp/yale_tddfa.parquet --out bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _in_process(task_name: str, data, epochs: int, image_size: int, crops=None) -> float:
    from facedist.training.engine import TrainConfig, fit
    from facedist.training.image_baseline import make_image_task
    from facedist.training.tasks import make_classifier_task

    cfg = TrainConfig(task=task_name, epochs=epochs, batch_size=32, aggregate="mean", image_size=image_size,
                      patience=100, warmup_epochs=0)
    task = make_image_task(cfg, data, crops) if task_name.startswith("image_") else make_classifier_task(cfg, data)
    result = fit(task, cfg)
    # Skip the first epoch (allocator / thread warm-up).
    per_input = [h["seconds_per_input"] for h in result.history[1:]] or [result.history[0]["seconds_per_input"]]
    return float(sum(per_input) / len(per_input))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 112],
                        help="image baseline crop sizes (224: ResNet-34's standard input, the report's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    import torch

    from facedist.training.data import load_data
    from facedist.training.image_baseline import load_crops

    torch.set_num_threads(args.threads)
    data = load_data(args.data)
    result = {"data": args.data, "threads": args.threads, "image_sizes": args.image_sizes,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "batch_size": 32}
    coefficients = _in_process("identity", data, args.epochs, args.image_sizes[0])
    result["coefficients_identity_s_per_input"] = coefficients
    for size in args.image_sizes:
        images = _in_process("image_identity", data, args.epochs, size, load_crops(data, size))
        result[f"images_{size}px_identity_s_per_input"] = images
        result[f"speedup_coefficients_vs_images_{size}px"] = images / coefficients
    if not args.skip_ray:
        import ray

        from facedist.training import TrainConfig, run_training

        ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as out:
                cfg = TrainConfig(task="identity", data=args.data, output=out, epochs=args.epochs, batch_size=32,
                                  aggregate="mean", num_workers=workers, cpus_per_worker=args.threads / workers,
                                  patience=100, name=f"bench-{workers}", warmup_epochs=0)
                started = time.perf_counter()
                summary = run_training(cfg)
                per_input = [h["seconds_per_input"] for h in summary["history"][1:]]
                result[f"ray_{workers}_workers_s_per_input"] = sum(per_input) / max(len(per_input), 1)
                result[f"ray_{workers}_workers_wall_s"] = time.perf_counter() - started
        result["ray_2_vs_1_speedup"] = result["ray_1_workers_s_per_input"] / result["ray_2_workers_s_per_input"]
        ray.shutdown()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
