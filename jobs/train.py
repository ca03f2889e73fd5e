"""Ray Train job: fit C-Net or a coefficient classifier from a coefficients table.

    python jobs/train.py --task cnet --data s3://bucket/coeffs --output s3://bucket/train --workers 2
    python jobs/train.py --task identity --data ... --output ... --cnet s3://bucket/train/cnet

Same --output and --name again: continues from the latest checkpoint. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facedist.training import TrainConfig, run_training  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True,
                        choices=["cnet", "identity", "expression", "gender", "image_identity", "image_expression"])
    parser.add_argument("--data", required=True, help="coefficients table (local or s3://)")
    parser.add_argument("--output", required=True, help="checkpoints + final bundle (local or s3://)")
    parser.add_argument("--name", help="run name (default <task>-fold<k>); reuse it to resume")
    parser.add_argument("--workers", type=int, default=1, dest="num_workers")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, dest="cpus_per_worker")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, dest="use_gpu",
                        help="use GPUs (default: when the cluster has them)")
    parser.add_argument("--labels", nargs="+", help="restrict/order the classes")
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    for f in fields(TrainConfig):
        if f.name in {"task", "data", "output", "name", "num_workers", "cpus_per_worker", "use_gpu", "labels"}:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0].replace("'", ""), str)
        if f.name == "max_epoch_seconds":
            kind = float
        parser.add_argument(flag, type=kind, default=f.default, dest=f.name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    address = args.pop("ray_address")
    if address:
        import ray
        ray.init(address=address)
    config = TrainConfig(**args)
    summary = run_training(config)
    summary["history"] = [{k: v for k, v in h.items() if k != "confusion"} for h in summary["history"]]
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
