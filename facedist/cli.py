"""`facedist` command line: extract, models, train, report, serve, run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facedist import assets, storage


def _add_storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=None,
                        help="S3 endpoint URL for MinIO/Ceph-style stores (default: AWS_ENDPOINT_URL)")


def _s3_options(args) -> storage.S3Options:
    env = storage.S3Options.from_env()
    return storage.S3Options(endpoint_url=args.endpoint or env.endpoint_url, region=env.region)


def _progress(done: int, total: int) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def discover_records(source: str, dataset: str, options: storage.S3Options):
    """Image records from a folder, an s3:// prefix, or a CSV/Parquet manifest with labels."""
    from facedist.datasets import records_from_manifest, records_from_paths

    if source.endswith((".csv", ".parquet")) and storage.exists(source, options):
        return records_from_manifest(source)
    paths = storage.list_files(source, options)
    return records_from_paths(paths, dataset=dataset, root=source)


def cmd_extract(args) -> int:
    from facedist.pipeline import ExtractConfig, run_extraction

    options = _s3_options(args)
    config = ExtractConfig(backend=args.backend, landmarks=args.landmarks, device=args.device,
                           batch_size=args.batch_size, max_side=args.max_side, preview=args.preview,
                           resume=not args.no_resume)
    if args.ray:
        from facedist.ray_extract import RayExtractConfig, run_ray_extraction

        summary = run_ray_extraction(args.images, args.out, RayExtractConfig(
            extract=config, actors=args.actors, dataset=args.dataset), address=args.address, options=options)
    else:
        records = discover_records(args.images, args.dataset, options)
        summary = run_extraction(records, args.out, config, options=options, progress=_progress)
    counts = summary["counts"]
    run = summary.get("run", {})
    print(f"extracted {summary['rows']} rows into {args.out}: ok {counts.get('ok', 0)}, "
          f"no_face {counts.get('no_face', 0)}, error {counts.get('error', 0)}"
          + (f"; this run wrote {run.get('written')} and skipped {run.get('skipped')} already done"
             f" in {run.get('seconds')} s" if run else ""))
    return 0


def cmd_models(args) -> int:
    if args.action == "download":
        failed = 0
        for relpath, spec in assets.MODEL_FILES.items():
            if spec.url is None:
                continue
            try:
                print(f"{relpath}: {assets.resolve(relpath)}")
            except assets.ModelNotFoundError as exc:
                failed += 1
                print(f"{relpath}: {exc}", file=sys.stderr)
        return 1 if failed else 0
    if args.action == "resolve":
        try:
            print(assets.resolve(args.file))
            return 0
        except assets.ModelNotFoundError as exc:
            print(exc, file=sys.stderr)
            return 1
    rows = assets.status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"model directory ({assets.MODEL_DIR_ENV}): {assets.model_dir() or '(unset)'}")
    print(f"download cache ({assets.CACHE_DIR_ENV}): {assets.cache_dir()}")
    for row in rows:
        where = row["path"] or ("missing (downloadable)" if row["downloadable"] else "missing (user-supplied)")
        print(f"  {row['file']:40s} {where}  [{row['licence']}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facedist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ext = sub.add_parser("extract", help="images (folder, s3:// prefix or manifest) -> Parquet coefficients")
    ext.add_argument("images")
    ext.add_argument("--out", required=True, help="output folder or s3:// prefix")
    ext.add_argument("--backend", default="tddfa", choices=("tddfa", "deep3d", "fit"))
    ext.add_argument("--landmarks", default="dlib", choices=("dlib", "face-alignment"))
    ext.add_argument("--dataset", default="auto", choices=("auto", "kdef", "yale", "fei", "folder", "none"),
                     help="how to read labels from file names")
    ext.add_argument("--device", default="cpu")
    ext.add_argument("--batch-size", type=int, default=32)
    ext.add_argument("--max-side", type=int, default=2048, help="downscale larger images on decode")
    ext.add_argument("--preview", type=int, default=0, metavar="N",
                     help="write N PNG overlays (landmarks + mesh) under OUT/previews")
    ext.add_argument("--no-resume", action="store_true", help="redo images already in OUT")
    ext.add_argument("--ray", action="store_true", help="run as a Ray Data job (local Ray unless --address)")
    ext.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    ext.add_argument("--actors", type=int, default=2, help="extraction actors (with --ray)")
    _add_storage_flags(ext)
    ext.set_defaults(func=cmd_extract)

    mod = sub.add_parser("models", help="list, resolve or download model files")
    mod.add_argument("action", nargs="?", default="list", choices=("list", "resolve", "download"))
    mod.add_argument("file", nargs="?", help="with resolve: e.g. tddfa/mb05_120x120.pth")
    mod.add_argument("--json", action="store_true")
    mod.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except assets.ModelNotFoundError as exc:
        print(f"facedist: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
