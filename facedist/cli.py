"""`facedist` command line: extract, models, train, report, serve, run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facedist import SettingsError, assets, storage


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


def add_extractor_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose an extractor: shared by extract, run, serve and jobs/extract.py."""
    # Cheap imports (no torch): the registries are the choices.
    from facedist.detection import DEFAULT_DETECTOR, DETECTORS
    from facedist.extractors import BACKENDS, DEFAULT_LANDMARKS, LANDMARK_SOURCES

    parser.add_argument("--backend", default="tddfa", choices=BACKENDS,
                        help="coefficient regressor (default: %(default)s)")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, choices=DETECTORS,
                        help="face detector (default: %(default)s)")
    defaults = ", ".join(f"{b}: {s}" for b, s in DEFAULT_LANDMARKS.items())
    parser.add_argument("--landmarks", default=None, choices=LANDMARK_SOURCES,
                        help=f"where the 68 landmarks come from (default per backend: {defaults}; "
                             "tddfa takes only its own)")


def extract_config_from_args(args, **overrides):
    """ExtractConfig from the flags above (+ overrides); a combination no backend takes fails
    here, before Ray or any model starts."""
    from facedist.extractors import landmark_source_for
    from facedist.pipeline import ExtractConfig

    landmark_source_for(args.backend, args.landmarks)  # SettingsError with what to use instead
    return ExtractConfig(backend=args.backend, detector=args.detector, landmarks=args.landmarks, **overrides)


def cmd_extract(args) -> int:
    from facedist.pipeline import discover_records, run_extraction

    options = _s3_options(args)
    config = extract_config_from_args(
        args, device=args.device, batch_size=args.batch_size, max_side=args.max_side, preview=args.preview,
        resume=not args.no_resume, detect_threads=args.detect_threads)
    if args.ray:
        from facedist.ray_extract import RayExtractConfig, run_ray_extraction

        summary = run_ray_extraction(args.images, args.out, RayExtractConfig(
            extract=config, actors=args.actors, dataset=args.dataset, actor_num_cpus=args.actor_cpus,
            actor_num_gpus=args.actor_gpus), address=args.address, options=options)
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


TRAIN_TASKS = ("cnet", "identity", "expression", "gender", "image_identity", "image_expression")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for one training run: every TrainConfig field, so the job and the CLI never drift."""
    from dataclasses import MISSING, fields

    from facedist.training.engine import TrainConfig

    parser.add_argument("--task", required=True, choices=TRAIN_TASKS)
    parser.add_argument("--data", required=True, help="coefficients table (local or s3://)")
    parser.add_argument("--output", required=True, help="checkpoints + final bundle (local or s3://)")
    parser.add_argument("--name", help="run name (default <task>-fold<k>); reuse it to resume")
    parser.add_argument("--workers", type=int, default=1, dest="num_workers")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, dest="cpus_per_worker")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, dest="use_gpu",
                        help="use GPUs (default: when the cluster has them)")
    parser.add_argument("--labels", nargs="+", help="restrict/order the classes")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    types = {"int": int, "float": float, "str": str, "float | None": float, "str | None": str}
    for f in fields(TrainConfig):
        if f.name in {"task", "data", "output", "name", "num_workers", "cpus_per_worker", "use_gpu", "labels"}:
            continue
        default = None if f.default is MISSING else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), type=types.get(str(f.type), str),
                            default=default, dest=f.name)


def cmd_train(args) -> int:
    from facedist.training import TrainConfig, run_training

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command", "address", "json")}
    if args.address:
        import ray

        ray.init(address=args.address)
    summary = run_training(TrainConfig(**values))
    best = summary["best"]
    if args.json:
        summary["history"] = [{k: v for k, v in h.items() if k != "confusion"} for h in summary["history"]]
        print(json.dumps(summary, indent=2, default=str))
    else:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()
                 if k in ("epoch", "accuracy", "macro_f1", "loss", "val_loss", "loo_error", "gain_vs_mean")}
        print(f"trained {summary['task']} ({summary['workers']} workers): best {shown}; "
              f"model bundle at {summary['bundle']}")
    return 0


def cmd_report(args) -> int:
    from facedist.report import ReportConfig, write_report

    # Flags left unset take ReportConfig's defaults: one place for them.
    given = {k: getattr(args, k) for k in ("out", "folds", "seed", "coeff_epochs", "cnet_epochs", "image_epochs",
                                           "image_size") if getattr(args, k) is not None}
    config = ReportConfig(data=args.data, include_images=not args.no_images, synthetic=not args.no_synthetic,
                          **given)
    results = write_report(config)
    print(Path(config.out, "table1_identity.md").read_text())
    print(f"report written to {config.out} in {results['seconds']:.0f} s")
    return 0


def cmd_serve(args) -> int:
    from facedist.serving.app import run_server

    extract_config_from_args(args)  # fail on a bad combination before Ray starts
    run_server(args.models or None, address=args.address, host=args.host, port=args.port,
               route_prefix=args.route_prefix, backend=args.backend, detector=args.detector,
               landmarks=args.landmarks, max_batch_size=args.max_batch_size)
    return 0


def cmd_run(args) -> int:
    from facedist.workflow import WorkflowConfig, run_workflow

    extract_config_from_args(args)  # fail on a bad combination before Ray starts
    run_workflow(WorkflowConfig(
        images=args.images, out=args.out, backend=args.backend, detector=args.detector,
        landmarks=args.landmarks, dataset=args.dataset, resume=not args.no_resume, actors=args.actors,
        epochs=args.epochs, cnet_epochs=args.cnet_epochs, workers=args.workers, report=not args.no_report,
        report_folds=args.report_folds, image_epochs=args.image_epochs, image_size=args.image_size,
        address=args.address))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facedist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ext = sub.add_parser("extract", help="images (folder, s3:// prefix or manifest) -> Parquet coefficients")
    ext.add_argument("images")
    ext.add_argument("--out", required=True, help="output folder or s3:// prefix")
    add_extractor_arguments(ext)
    ext.add_argument("--dataset", default="auto", choices=("auto", "kdef", "yale", "fei", "folder", "none"),
                     help="how to read labels from file names")
    ext.add_argument("--device", default="cpu")
    ext.add_argument("--batch-size", type=int, default=64, help="images per extractor call and per Parquet part")
    ext.add_argument("--max-side", type=int, default=2048, help="downscale larger images on decode")
    ext.add_argument("--detect-threads", type=int, default=0,
                     help="dlib HOG detection threads per process (0: every core; per actor: its CPU share)")
    ext.add_argument("--preview", type=int, default=0, metavar="N",
                     help="write N PNG overlays (landmarks + mesh) under OUT/previews")
    ext.add_argument("--no-resume", action="store_true",
                     help="replace what OUT holds (default: skip images done, refuse other settings)")
    ext.add_argument("--ray", action="store_true", help="run as a Ray Data job (local Ray unless --address)")
    ext.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    ext.add_argument("--actors", type=int, default=2, help="extraction actors (with --ray)")
    ext.add_argument("--actor-cpus", type=float, default=None, help="CPUs per actor (with --ray; default: share)")
    ext.add_argument("--actor-gpus", type=float, default=None, help="GPUs per actor (with --ray; default: 1 if any)")
    _add_storage_flags(ext)
    ext.set_defaults(func=cmd_extract)

    train = sub.add_parser("train", help="fit C-Net or a classifier on Ray Train from a coefficients table")
    add_train_arguments(train)
    train.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    train.set_defaults(func=cmd_train)

    rep = sub.add_parser("report", help="the paper's protocol on a coefficients table: tables, confusion matrices")
    rep.add_argument("--data", required=True, help="coefficients table (local or s3://)")
    rep.add_argument("--out", help="local folder (default: results)")
    rep.add_argument("--folds", type=int, help="default: ReportConfig")
    rep.add_argument("--seed", type=int, help="folds and training seed (default: ReportConfig)")
    rep.add_argument("--coeff-epochs", type=int, help="default: ReportConfig")
    rep.add_argument("--cnet-epochs", type=int, help="default: ReportConfig")
    rep.add_argument("--image-epochs", type=int, help="default: ReportConfig")
    rep.add_argument("--image-size", type=int, help="default: ReportConfig")
    rep.add_argument("--no-images", action="store_true", help="skip the raw-image baseline")
    rep.add_argument("--no-synthetic", action="store_true", help="skip the synthetic C-Net check")
    rep.set_defaults(func=cmd_report)

    srv = sub.add_parser("serve", help="start the Ray Serve endpoint (local Ray unless --address)")
    srv.add_argument("--models", default="", help="the training output (cnet/, identity/, ... bundles)")
    srv.add_argument("--address", default=None)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--route-prefix", default="/", help="serve the page and the API under this path")
    add_extractor_arguments(srv)
    srv.add_argument("--max-batch-size", type=int, default=16)
    srv.set_defaults(func=cmd_serve)

    run = sub.add_parser("run", help="the whole flow: extract, train C-Net and classifiers, report")
    run.add_argument("--images", required=True, help="folder, s3:// prefix or manifest")
    run.add_argument("--out", required=True, help="folder or s3:// prefix for everything it writes")
    add_extractor_arguments(run)
    run.add_argument("--dataset", default="auto", choices=("auto", "kdef", "yale", "fei", "folder", "none"))
    run.add_argument("--actors", type=int, default=2)
    run.add_argument("--epochs", type=int, default=40, help="classifier epochs")
    run.add_argument("--cnet-epochs", type=int, default=20)
    run.add_argument("--workers", type=int, default=1, help="Ray Train workers per task")
    run.add_argument("--report-folds", type=int, default=3)
    run.add_argument("--image-epochs", type=int, default=8, help="image baseline epochs in the report")
    run.add_argument("--image-size", type=int, default=112, help="image baseline crops in the report")
    run.add_argument("--no-report", action="store_true")
    run.add_argument("--no-resume", action="store_true",
                     help="replace coefficients an earlier run left in OUT (default: skip images done, "
                          "refuse other settings)")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    run.set_defaults(func=cmd_run)

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
    except (assets.ModelNotFoundError, SettingsError) as exc:
        # Missing models, a flag combination no backend takes, an output made with other settings.
        print(f"facedist: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
