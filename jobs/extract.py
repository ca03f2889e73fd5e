"""Distributed coefficient extraction: images under a prefix (or a manifest) -> Parquet parts.

    ray job submit --working-dir . -- python jobs/extract.py \\
        --input s3://bucket/raw/ --output s3://bucket/coeffs/ --backend tddfa --actors 8

Without --address (and outside `ray job submit`, which sets RAY_ADDRESS) it starts a local Ray.
S3 credentials come from the standard chain; --endpoint (or AWS_ENDPOINT_URL) points at MinIO/Ceph.
Rerunning with the same --output skips images already extracted (path + content hash); an output
made with other settings (backend, detector, landmarks, model) is refused unless --no-resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# `python jobs/extract.py` puts jobs/ on sys.path, not the repository root that holds facedist/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facedist import SettingsError, storage  # noqa: E402
from facedist.cli import add_extractor_arguments, extract_config_from_args  # noqa: E402
from facedist.extraction.distributed import RayExtractConfig, run_ray_extraction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder, s3:// prefix, or CSV/Parquet manifest with labels")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix for Parquet parts")
    add_extractor_arguments(p)
    p.add_argument("--dataset", default="auto", help="how to read labels from file names (auto, yale, kdef, ...)")
    p.add_argument("--device", default="cpu", help="cpu; actors switch to cuda when they get a GPU")
    p.add_argument("--actors", type=int, default=2, help="extraction actors (each loads the models once)")
    p.add_argument("--batch-size", type=int, default=64, help="images per actor call and per Parquet part")
    p.add_argument("--actor-cpus", type=float, default=None, help="CPUs per actor (default: share the cluster)")
    p.add_argument("--actor-gpus", type=float, default=None, help="GPUs per actor (default: 1 when present)")
    p.add_argument("--decode-cpus", type=float, default=0.25, help="CPUs per read/decode task")
    p.add_argument("--max-side", type=int, default=2048, help="downscale larger images on decode")
    p.add_argument("--detect-threads", type=int, default=0,
                   help="dlib HOG detection threads per actor (0: its CPU share, at least 1)")
    p.add_argument("--preview", type=int, default=0, metavar="N", help="write N overlays under OUTPUT/previews")
    p.add_argument("--no-resume", action="store_true",
                   help="replace what OUTPUT holds (default: skip images done, refuse other settings)")
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = storage.S3Options.from_env()
    options = storage.S3Options(endpoint_url=args.endpoint or env.endpoint_url, region=env.region)
    try:
        extract = extract_config_from_args(
            args, device=args.device, batch_size=args.batch_size, max_side=args.max_side, preview=args.preview,
            resume=not args.no_resume, detect_threads=args.detect_threads)
    except SettingsError as exc:
        parser.error(str(exc))
    config = RayExtractConfig(extract=extract, actors=args.actors, actor_num_cpus=args.actor_cpus,
                              actor_num_gpus=args.actor_gpus, decode_num_cpus=args.decode_cpus,
                              dataset=args.dataset, progress=not args.no_progress)
    try:
        summary = run_ray_extraction(args.input, args.output, config, address=args.address, options=options)
    except SettingsError as exc:  # an output made with other settings: say so, no traceback
        parser.error(str(exc))
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if summary["run"]["unaccounted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
