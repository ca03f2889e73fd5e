"""`facedist` command line: extract, predict, models, train, report, serve, run."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from facedist import SettingsError, assets, storage

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its real default, unless the help already says what the
    default is or there is none to show (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a non-negative integer")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return number


def texture_basis_arg(value: str) -> str | None:
    """--texture-basis: 'none' turns tex_coeffs off (None)."""
    return None if value.strip().lower() == "none" else value


def boolean(text: str) -> bool:
    """true / false (also yes / no, 1 / 0)."""
    value = text.strip().lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: say true or false")
    return value in ("true", "yes", "1")


def input_groups(text: str) -> tuple[str, ...]:
    """--inputs id,tex: descriptor groups (schema.INPUT_GROUPS)."""
    from facedist.schema import parse_inputs

    try:
        return parse_inputs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_input(uri: str | None, what: str) -> None:
    """A local input that is not there fails here, before Ray or any model starts (s3:// inputs
    are checked by the job that reads them)."""
    if uri and not storage.is_s3(uri) and not Path(uri).expanduser().exists():
        raise SettingsError(f"{what} {uri!r} does not exist")


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=None,
                        help="S3 endpoint URL for MinIO/Ceph-style stores (default: AWS_ENDPOINT_URL)")


def add_address_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def s3_options(args) -> storage.S3Options:
    env = storage.S3Options.from_env()
    return storage.S3Options(endpoint_url=args.endpoint or env.endpoint_url, region=env.region)


# ---- the extractor and extraction flags: extract, predict, serve, run and jobs/extract.py ---------

def add_extractor_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose an extractor: shared by extract, run, serve and jobs/extract.py."""
    # Cheap imports (no torch): the registries are the choices.
    from facedist.detection import DEFAULT_DETECTOR, DETECTORS
    from facedist.extractors import DEFAULT_BACKEND, DEFAULT_TEXTURE_BASIS
    from facedist.extractors.backends import default_landmark_sources, list_backends, texture_backends
    from facedist.extractors.landmark_sources import LANDMARK_SOURCES

    parser.add_argument("--backend", default=DEFAULT_BACKEND, choices=list_backends(),
                        help="coefficient regressor (default: %(default)s)")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, choices=DETECTORS,
                        help="face detector (default: %(default)s)")
    defaults = ", ".join(f"{b}: {s}" for b, s in default_landmark_sources().items())
    parser.add_argument("--landmarks", default=None, dest="landmark_source", choices=LANDMARK_SOURCES,
                        help=f"where the 68 landmarks come from (default per backend: {defaults}; "
                             "tddfa takes only its own)")
    parser.add_argument("--texture-basis", default=DEFAULT_TEXTURE_BASIS, type=texture_basis_arg, metavar="URI",
                        help=f"texture basis that fills tex_coeffs with {', '.join(texture_backends())}: "
                             f"'{DEFAULT_TEXTURE_BASIS}' (the shipped London basis, {assets.DEFAULT_TEXTURE_BASIS_FILE}), "
                             "a .npz from `facedist texture fit`, or 'none' (the sampled texture only) "
                             "(default: %(default)s)")
    parser.add_argument("--no-texture", action="store_true",
                        help="do not sample face colour on the fitted mesh (default: sample it)")
    parser.add_argument("--no-face-embedding", action="store_true",
                        help="do not fill face_embedding, dlib's 128-d face descriptor of each face "
                             "(default: fill it)")
    parser.add_argument("--no-face-attributes", action="store_true",
                        help="do not fill expression_feature, expression_probs, faceapi_age and faceapi_gender_male, "
                             "face-api's expression and age/gender nets on each face (default: fill them)")


def extractor_choices(args) -> dict:
    """The ExtractConfig fields add_extractor_arguments' flags set; a combination no backend takes
    fails here, before Ray or any model starts."""
    from facedist.extractors import landmark_source_for, texture_basis_for

    landmark_source_for(args.backend, args.landmark_source)  # SettingsError with what to use instead
    # The shipped basis resolves here (its sha256 checked), a given one must exist: before any work.
    check_input(texture_basis_for(args.backend, not args.no_texture, args.texture_basis), "--texture-basis")
    return dict(backend=args.backend, detector=args.detector, landmark_source=args.landmark_source,
                texture=not args.no_texture, texture_basis=args.texture_basis,
                face_embedding=not args.no_face_embedding, face_attributes=not args.no_face_attributes)


def extract_config_from_args(args, **overrides):
    """ExtractConfig from add_extractor_arguments' flags (+ overrides)."""
    from facedist.extraction.config import ExtractConfig

    return ExtractConfig(**{**extractor_choices(args), **overrides})


def add_extraction_arguments(parser: argparse.ArgumentParser, defaults=None) -> None:
    """How an extraction runs (batches, resume, Ray actors): extract, run and jobs/extract.py.
    defaults: the RayExtractConfig whose values the flags show and start from (its own defaults
    unless given: `facedist run` starts from WorkflowConfig's)."""
    from facedist.datasets import DATASETS
    from facedist.extraction.distributed import RayExtractConfig

    job = defaults or RayExtractConfig()
    one = job.extract
    parser.add_argument("--dataset", default=job.dataset, choices=DATASETS, help="how to read labels from file names")
    parser.add_argument("--device", default=one.device,
                        help="torch device (cpu, cuda, cuda:1, ...); Ray actors take cuda when they get a GPU")
    parser.add_argument("--batch-size", type=positive_int, default=one.batch_size,
                        help="images per extractor call and per Parquet part")
    parser.add_argument("--max-side", type=positive_int, default=one.max_side, help="downscale larger images on decode")
    parser.add_argument("--detect-threads", type=non_negative_int, default=one.detect_threads,
                        help="dlib HOG detection threads per process (0: every core; per actor: its CPU share)")
    parser.add_argument("--preview", type=non_negative_int, default=one.preview, metavar="N",
                        help="write N PNG overlays (landmarks + mesh) under OUT/previews")
    parser.add_argument("--no-resume", action="store_true",
                        help="replace what OUT holds (default: skip images done, refuse other settings)")
    parser.add_argument("--actors", type=positive_int, default=job.actors,
                        help="extraction actors under Ray (each loads the models once)")
    parser.add_argument("--actor-cpus", type=positive_float, default=job.actor_num_cpus,
                        help="CPUs per actor (default: a share of the cluster)")
    parser.add_argument("--actor-gpus", type=float, default=job.actor_num_gpus,
                        help="GPUs per actor (default: 1 when the cluster has GPUs)")
    parser.add_argument("--decode-cpus", type=positive_float, default=job.decode_num_cpus,
                        help="CPUs per read/decode task under Ray")


def ray_extract_config_from_args(args, **overrides):
    """RayExtractConfig from add_extractor_arguments' and add_extraction_arguments' flags."""
    from facedist.extraction.distributed import RayExtractConfig

    extract = extract_config_from_args(args, device=args.device, batch_size=args.batch_size, max_side=args.max_side,
                                       preview=args.preview, resume=not args.no_resume,
                                       detect_threads=args.detect_threads)
    return RayExtractConfig(extract=extract, actors=args.actors, dataset=args.dataset, actor_num_cpus=args.actor_cpus,
                            actor_num_gpus=args.actor_gpus, decode_num_cpus=args.decode_cpus, **overrides)


# ---- the commands: each one's flags beside its handler ------------------------------------------

def add_extract_command(command) -> None:
    ext = command("extract", "images (folder, s3:// prefix or manifest) -> Parquet coefficients")
    ext.add_argument("images", help="folder, s3:// prefix, or CSV/Parquet manifest with a path column")
    ext.add_argument("--out", required=True, help="output folder or s3:// prefix")
    add_extractor_arguments(ext)
    add_extraction_arguments(ext)
    ext.add_argument("--ray", action="store_true", help="run as a Ray Data job (local Ray unless --address)")
    add_address_flag(ext)
    add_storage_flags(ext)
    ext.set_defaults(func=cmd_extract)


def cmd_extract(args) -> int:
    from facedist.extraction.local import run_extraction
    from facedist.extraction.rows import discover_records

    check_input(args.images, "IMAGES")
    options = s3_options(args)
    config = ray_extract_config_from_args(args)
    if args.ray:
        from facedist.extraction.distributed import run_ray_extraction

        summary = run_ray_extraction(args.images, args.out, config, address=args.address, options=options)
    else:
        from facedist.progress import progress_bar

        records = discover_records(args.images, args.dataset, options)
        summary = run_extraction(records, args.out, config.extract, options=options, progress=progress_bar("images"))
    counts = summary["counts"]
    run = summary.get("run", {})
    print(f"extracted {summary['rows']} rows into {args.out}: ok {counts.get('ok', 0)}, "
          f"no_face {counts.get('no_face', 0)}, error {counts.get('error', 0)}"
          + (f"; this run wrote {run.get('written')} and skipped {run.get('skipped')} already done"
             f" in {run.get('seconds')} s" if run else ""))
    return 0


def add_predict_command(command) -> None:
    from facedist.datasets import DATASETS
    from facedist.prediction.rows import PredictConfig

    pred = command("predict", "batch inference on Ray Data: a coefficients table (or images) -> Parquet predictions")
    pred.add_argument("input", help="coefficients table (folder of Parquet parts or s3:// prefix), or images: "
                                    "folder, s3:// prefix or manifest (extracted first)")
    pred.add_argument("--models", required=True, help="the training output (cnet/, identity/, gender/, expression/)")
    pred.add_argument("--out", required=True, help="output folder or s3:// prefix")
    pred.add_argument("--top-k", type=positive_int, default=PredictConfig.top_k, help="identity labels ranked per row")
    pred.add_argument("--group-by", default=None, metavar="COLUMN",
                      help="rows with one value of this table column are one person: adds their identity together "
                           "(group_identity) to each of them")
    pred.add_argument("--gallery", default=None, metavar="URI",
                      help="also match each row's photo against this gallery (gallery_identity: the top-1 or "
                           "'unknown', gallery_score); the embedding is MODELS/embedding")
    pred.add_argument("--batch-size", type=positive_int, default=PredictConfig.batch_size,
                      help="rows per actor call and per Parquet part")
    pred.add_argument("--actors", type=positive_int, default=PredictConfig.actors,
                      help="prediction actors (and extraction actors for images)")
    add_address_flag(pred)
    pred.add_argument("--no-resume", action="store_true",
                      help="replace what OUT holds (default: skip rows done, refuse other models)")
    pred.add_argument("--coefficients", default=None, metavar="URI",
                      help="images: where their coefficients go (default: OUT/_coefficients)")
    add_extractor_arguments(pred)
    pred.add_argument("--dataset", default=PredictConfig.dataset, choices=DATASETS,
                      help="images: how to read labels from file names")
    add_storage_flags(pred)
    pred.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from facedist.prediction.rows import PredictConfig
    from facedist.prediction.distributed import run_ray_prediction

    check_input(args.input, "INPUT")
    check_input(args.models, "--models")
    extract = extract_config_from_args(args, resume=not args.no_resume)
    config = PredictConfig(models=args.models, top_k=args.top_k, group_by=args.group_by, batch_size=args.batch_size,
                           actors=args.actors, resume=not args.no_resume, extract=extract,
                           coefficients=args.coefficients, dataset=args.dataset, gallery=args.gallery)
    summary = run_ray_prediction(args.input, args.out, config, address=args.address, options=s3_options(args))
    return 0 if not summary["run"]["unaccounted"] else 1


def add_train_command(command) -> None:
    train = command("train", "fit C-Net or a classifier on Ray Train from a coefficients table")
    add_train_arguments(train)
    train.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    train.set_defaults(func=cmd_train)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for one training run: every TrainConfig field, so the job and the CLI never drift."""
    from dataclasses import MISSING, fields

    from facedist.training.engine import SELECTS, TrainConfig
    from facedist.training.presets import describe_presets
    from facedist.training.sharded import INGESTS
    from facedist.training.task_registry import TASKS
    from facedist.training.tasks import AGGREGATES, HEADS, INPUT_NORMS

    from facedist.gallery.embedding import EMBEDDING_TASK

    # Several tasks train one after another in one process (one job on a cluster, not one each).
    parser.add_argument("--task", required=True, nargs="+", choices=(*TASKS, EMBEDDING_TASK),
                        help="what to train (embedding: the gallery's, facedist.gallery); several train in "
                             "this order, and identity after cnet takes the C-Net just trained (OUTPUT/cnet)")
    parser.add_argument("--data", required=True, help="coefficients table (local or s3://)")
    parser.add_argument("--output", required=True, help="checkpoints + final bundle (local or s3://)")
    parser.add_argument("--name", help="run name (default: <task>-fold<k>); reuse it to resume")
    parser.add_argument("--workers", type=positive_int, default=TrainConfig.num_workers, dest="num_workers",
                        help="Ray Train workers")
    parser.add_argument("--cpus-per-worker", type=positive_float, default=TrainConfig.cpus_per_worker,
                        dest="cpus_per_worker", help="CPUs each worker reserves")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, dest="use_gpu",
                        help="use GPUs (default: when the cluster has them)")
    parser.add_argument("--labels", nargs="+", help="restrict/order the classes (default: every label in the table)")
    add_address_flag(parser)
    choices = {"aggregate": AGGREGATES, "input_norm": INPUT_NORMS, "head": HEADS, "select": SELECTS, "ingest": INGESTS}
    types = {"int": int, "float": float, "str": str, "float | None": float, "str | None": str,
             "int | None": non_negative_int, "tuple[str, ...] | None": input_groups, "bool": boolean}
    for f in fields(TrainConfig):
        if f.name in {"task", "data", "output", "name", "num_workers", "cpus_per_worker", "use_gpu", "labels"}:
            continue
        default = None if f.default is MISSING else f.default
        kind = types.get(str(f.type), str)
        if kind is int and isinstance(default, int) and default > 0:
            kind = positive_int
        # Unset flags stay None: preset_config then takes the task's preset (training.presets).
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, dest=f.name,
                            choices=choices.get(f.name),
                            help=f"TrainConfig.{f.name} (default: {describe_presets(f.name)})")


def cmd_train(args) -> int:
    from facedist.schema import DEFAULT_INPUTS
    from facedist.training import run_training
    from facedist.training.presets import preset_config

    tasks = list(dict.fromkeys(args.task))
    check_input(args.data, "--data")
    check_input(args.cnet, "--cnet")
    if tasks == ["embedding"]:  # facedist.gallery.embedding.EMBEDDING_TASK
        from facedist.gallery.command import train_embedding

        return train_embedding(args)
    if len(tasks) > 1 and ("embedding" in tasks or args.name or args.labels):
        raise SettingsError("several --task values train the classifiers one after another: without embedding "
                            "(a command of its own), --name or --labels (both belong to one task)")

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command", "address", "json", "verbose", "task")}
    scanned = None
    configs = []
    # Every task's settings are checked before the first one trains.
    for task in tasks:
        task_values = dict(values)
        if task == "identity" and args.cnet is None and "cnet" in tasks[:tasks.index(task)]:
            task_values["cnet"] = storage.join(storage.absolute(args.output), "cnet")
        config = preset_config(task, **task_values)
        if task in DEFAULT_INPUTS:
            from facedist.schema import inputs_label
            from facedist.training.presets import shipped_inputs
            from facedist.training.sharded import scan_groups
            from facedist.training.tasks import task_inputs
            from facedist.workflow import few_photos_note

            # File by file: a million-row table's descriptor columns never sit in this process at once.
            filled, subjects = scanned = scanned or scan_groups(args.data)
            if args.inputs is None and shipped_inputs(task, filled) != task_inputs(config):
                # The preset's groups this table lacks (extracted without them) are left out, and said.
                config = preset_config(task, **{**task_values, "inputs": shipped_inputs(task, filled)})
                print(f"note: {task}: the table lacks some of the preset's inputs; training on "
                      f"{inputs_label(task_inputs(config))}")
            note = few_photos_note(subjects, config.folds) if task == "identity" else None
            if note:
                print(f"note: {note}")
        configs.append(config)
    summaries = []
    for config in configs:
        summary = run_training(config, address=args.address)
        if args.json:
            summary["history"] = [{k: v for k, v in h.items() if k != "confusion"} for h in summary["history"]]
        else:
            from facedist.training.distributed import describe_best

            print(f"trained {summary['task']} ({summary['workers']} workers): {describe_best(summary['best'])}; "
                  f"model bundle at {summary['bundle']}", flush=True)
        summaries.append(summary)
    if args.json:  # one task: its summary; several: the list of them
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2, default=str))
    return 0


def add_report_command(command) -> None:
    from dataclasses import fields

    from facedist.reports.image import ReportConfig
    from facedist.training.presets import describe_presets, preset_value
    from facedist.training.tasks import COEFFICIENT_TASKS

    defaults = {f.name: f.default for f in fields(ReportConfig)}
    rep = command("report", "the paper's protocol on a coefficients table: tables, confusion matrices")
    rep.add_argument("--data", required=True, help="coefficients table (local or s3://)")
    rep.add_argument("--protocol", default="image", choices=("image", "person"),
                     help="image: the paper's k-fold split by image with C-Net; person: people never seen in "
                          "training (5 folds by person), gallery -> probe identity, linear probes on α, τ, β, pixels")
    rep.add_argument("--seeds", type=positive_int, default=None,
                     help="repeat every fold over N seeds (default: image protocol 1, from --seed; person protocol 5)")
    _add_person_report_flags(rep)
    rep.add_argument("--out", default=defaults["out"], help="local folder or s3:// prefix")
    rep.add_argument("--folds", type=positive_int, default=defaults["folds"], help="k-fold split by image")
    rep.add_argument("--seed", type=int, default=defaults["seed"], help="folds and training seed")
    rep.add_argument("--coeff-epochs", type=positive_int, default=defaults["coeff_epochs"],
                     help=f"epochs of the coefficient classifiers (default: the presets', "
                          f"{describe_presets('epochs', COEFFICIENT_TASKS)})")
    rep.add_argument("--cnet-epochs", type=positive_int, default=defaults["cnet_epochs"],
                     help=f"C-Net epochs (default: the preset's, {preset_value('cnet', 'epochs')})")
    rep.add_argument("--image-epochs", type=positive_int, default=defaults["image_epochs"],
                     help=f"epochs of the raw-image baseline (default: the preset's, "
                          f"{preset_value('image_identity', 'epochs')})")
    rep.add_argument("--image-size", type=positive_int, default=defaults["image_size"],
                     help=f"the image baseline's crop side in pixels (default: the preset's, "
                          f"{preset_value('image_identity', 'image_size')})")
    rep.add_argument("--no-images", action="store_true", help="skip the raw-image baseline")
    rep.add_argument("--max-rows", type=non_negative_int, default=None, dest="max_rows",
                     help=f"report on at most this many rows, whole people drawn by seed, with a note saying so "
                          f"(default: {ReportConfig.max_rows}; 0: every row)")
    rep.add_argument("--no-synthetic", action="store_true", help="skip the synthetic C-Net check")
    rep.set_defaults(func=cmd_report)


def _add_person_report_flags(rep: argparse.ArgumentParser) -> None:
    rep.add_argument("--heads", default=None, type=lambda v: tuple(h for h in v.split(",") if h),
                     help="person protocol: the trained models' heads, comma-separated (default: linear,mlp,resnet; "
                          "'' for none)")
    rep.add_argument("--model-seeds", type=positive_int, default=None, dest="model_seeds",
                     help="person protocol: the heads a task does not ship on the first N seeds only "
                          "(default: all; the shipped head runs on every seed)")
    rep.add_argument("--gallery", default=None, help="person protocol: expression label of each person's gallery "
                                                     "image (default: neutral; Yale: normal)")
    rep.add_argument("--image-seeds", type=positive_int, default=None,
                     help="person protocol: the ResNet-34 baseline on the first N seeds only (default: all)")


def cmd_report(args) -> int:
    if args.protocol == "person":
        from facedist.reports.person import PersonReportConfig, write_person_report

        check_input(args.data, "--data")
        given = {k: getattr(args, k) for k in ("out", "seeds", "gallery", "image_seeds", "heads", "model_seeds",
                                               "max_rows") if getattr(args, k) is not None}
        config = PersonReportConfig(data=args.data, include_images=not args.no_images, **given)
        results = write_person_report(config)
        print(Path(config.out, "table_person.md").read_text())
        print(f"report written to {config.out} in {results['seconds']:.0f} s")
        return 0
    from facedist.reports.image import ACCURACY_TABLES, ReportConfig, report_line, write_report_at

    check_input(args.data, "--data")
    config = ReportConfig(data=args.data, folds=args.folds, seed=args.seed, seeds=args.seeds or 1,
                          coeff_epochs=args.coeff_epochs, cnet_epochs=args.cnet_epochs, image_epochs=args.image_epochs,
                          image_size=args.image_size, include_images=not args.no_images,
                          synthetic=not args.no_synthetic,
                          **({"max_rows": args.max_rows} if args.max_rows is not None else {}))
    # The per-fold lines are this command's progress: on the terminal.
    results = write_report_at(args.out, config, log=print)
    for table in ACCURACY_TABLES:  # the same seed prints the same tables
        if storage.exists(storage.join(args.out, table)):
            print(storage.read_bytes(storage.join(args.out, table)).decode())
    print(f"report written to {args.out}: {report_line(results)}")
    return 0


def add_texture_command(command) -> None:
    tex = command("texture", "fit a PCA texture basis on a table's sampled face colours", ray=False)
    tex.add_argument("action", choices=("fit",))
    tex.add_argument("--data", required=True, help="coefficients table with a texture column (local or s3://)")
    tex.add_argument("--out", required=True, help="where the basis goes (.npz, local or s3://)")
    tex.add_argument("--components", type=int, default=80, help="PCA components (default: %(default)s)")
    add_storage_flags(tex)
    tex.set_defaults(func=cmd_texture)


def cmd_texture(args) -> int:
    from facedist.texture import fit_texture_basis

    basis = fit_texture_basis(args.data, args.out, args.components, s3_options(args))
    print(f"texture basis {basis.version}: {basis.n_components} components over {basis.n_vertices} vertices, "
          f"fitted on {basis.n_train} faces -> {args.out}")
    return 0


SERVE_FLAGS = ("max_batch_size", "batch_wait_timeout_s", "extractor_num_cpus", "min_replicas", "max_replicas",
               "num_replicas", "max_images", "max_image_bytes", "replica_retries", "max_ongoing_requests",
               "max_queued_requests", "ingress_max_accepted_images", "request_timeout_s", "shutdown_timeout_s")
SERVE_FLAG_DEFAULTS = {"num_replicas": "autoscaling", "max_replicas": "as many as the cluster's CPUs hold",
                       "ingress_max_accepted_images": "max-ongoing-requests x the extractor's most replicas"}


def add_serve_command(command) -> None:
    from dataclasses import fields

    from facedist.serving.settings import ServeSettings

    srv = command("serve", "start the Ray Serve endpoint (local Ray unless --address)")
    srv.add_argument("--models", default="",
                     help="the training output (cnet/, identity/, ... bundles); default: none, /v1/predict answers 503")
    add_address_flag(srv)
    srv.add_argument("--host", default="127.0.0.1", help="HTTP host")
    srv.add_argument("--port", type=positive_int, default=8000, help="HTTP port")
    srv.add_argument("--route-prefix", default="/", help="serve the page and the API under this path")
    srv.add_argument("--gallery", default=None, metavar="URI",
                     help="serve this gallery (facedist.gallery): /v1/gallery/{person}, /v1/identify, /v1/verify")
    srv.add_argument("--embedding", default=None, metavar="URI",
                     help="the gallery's embedding bundle (default: MODELS/embedding)")
    add_extractor_arguments(srv)
    serve_fields = {f.name: f for f in fields(ServeSettings)}
    for name in SERVE_FLAGS:
        kind = next(t for t in typing.get_args(serve_fields[name].type) or (serve_fields[name].type,)
                    if t is not type(None))
        # Counts of retries may be 0 (off); every other serve flag is a size, a count or a time > 0.
        parse = non_negative_int if name == "replica_retries" else {int: positive_int, float: positive_float}[kind]
        srv.add_argument("--" + name.replace("_", "-"), type=parse,
                         default=serve_fields[name].default,
                         help=f"ServeSettings.{name}" + (f" (default: {SERVE_FLAG_DEFAULTS[name]})"
                                                          if name in SERVE_FLAG_DEFAULTS else ""))
    srv.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from facedist.serving.app import run_server

    choices = extractor_choices(args)  # fail on a bad combination before Ray starts
    check_input(args.models, "--models")
    settings = {name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name) is not None}
    models = args.models or None
    settings.update(gallery_uri=args.gallery, embedding_uri=args.embedding)
    if args.gallery:
        from facedist.gallery.command import serve_uris

        models, settings["embedding_uri"] = serve_uris(models, args.embedding)
    # The extractor flags as flat settings: the server's own extraction defaults (ServeSettings.extract)
    # stay where these flags say nothing.
    run_server(models, address=args.address, host=args.host, port=args.port,
               route_prefix=args.route_prefix, **choices, **settings)
    return 0


def add_run_command(command) -> None:
    from facedist.training.presets import describe_presets, preset_value
    from facedist.training.tasks import COEFFICIENT_TASKS
    from facedist.workflow import WorkflowConfig

    run = command("run", "the whole flow: extract, train C-Net and classifiers, report")
    run.add_argument("--images", required=True, help="folder, s3:// prefix or manifest")
    run.add_argument("--out", required=True, help="folder or s3:// prefix for everything it writes")
    add_extractor_arguments(run)
    add_extraction_arguments(run, WorkflowConfig.default_extraction())
    run.add_argument("--epochs", type=positive_int, default=WorkflowConfig.epochs,
                     help=f"classifier epochs, in training and report (default: the presets', "
                          f"{describe_presets('epochs', COEFFICIENT_TASKS)})")
    run.add_argument("--cnet-epochs", type=positive_int, default=WorkflowConfig.cnet_epochs,
                     help=f"C-Net epochs (default: the preset's, {preset_value('cnet', 'epochs')})")
    run.add_argument("--workers", type=positive_int, default=WorkflowConfig.workers, help="Ray Train workers per task")
    run.add_argument("--report-folds", type=positive_int, default=WorkflowConfig.report_folds,
                     help="k of the report's k-fold protocol")
    run.add_argument("--report-seeds", type=positive_int, default=WorkflowConfig.report_seeds,
                     help="repeat the report's folds over this many seeds")
    run.add_argument("--full-report", action="store_true",
                     help="the report also trains the raw-image ResNet-34 baseline at "
                          f"{preset_value('image_identity', 'image_size')} px (slow on CPUs)")
    run.add_argument("--no-report", action="store_true", help="stop after training")
    add_address_flag(run)
    run.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from facedist.workflow import WorkflowConfig, run_workflow

    extraction = ray_extract_config_from_args(args)  # fails on a bad combination before Ray starts
    check_input(args.images, "--images")
    run_workflow(WorkflowConfig(
        images=args.images, out=args.out, extraction=extraction, epochs=args.epochs, cnet_epochs=args.cnet_epochs,
        workers=args.workers, report=not args.no_report, report_folds=args.report_folds,
        report_seeds=args.report_seeds, full_report=args.full_report, address=args.address))
    return 0


def add_models_command(command) -> None:
    mod = command("models", "list, resolve or download model files", ray=False)
    mod.add_argument("action", nargs="?", default="list", choices=("list", "resolve", "download"),
                     help="list (default), resolve FILE, or download the pinned files")
    mod.add_argument("file", nargs="?", help="with resolve: e.g. tddfa/mb05_120x120.pth")
    mod.add_argument("--json", action="store_true", help="with list: as JSON")
    mod.set_defaults(func=cmd_models)


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
        where = row["path"] or ("missing (downloadable)" if row["downloadable"] else
                                "missing (the package's copy is absent or altered)" if row["packaged"] else
                                "missing (user-supplied)")
        print(f"  {row['file']:40s} {where}  [{row['licence']}]")
    return 0


# The commands, in the order `facedist --help` lists them.
COMMANDS = (add_extract_command, add_predict_command, add_train_command, add_report_command, add_texture_command,
            add_serve_command, add_run_command, add_models_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facedist", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    # Every command that may start Ray takes --verbose (facedist.runtime: how quiet Ray is).
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--verbose", action="store_true",
                       help="show Ray's own logs and its workers' output (default: they go to a log file)")

    def command(name: str, help: str, ray: bool = True) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[quiet] if ray else [], formatter_class=HelpFormatter)

    for add in COMMANDS:
        add(command)
    # The gallery's own module builds its command (it gets the extractor flags handed in: no cycle).
    from facedist.gallery.command import add_parser as add_gallery_parser

    add_gallery_parser(sub, add_extractor_arguments, extract_config_from_args, HelpFormatter, [quiet])
    return parser


def main(argv: list[str] | None = None) -> int:
    from facedist import runtime

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        runtime.set_verbose(True)
    try:
        return args.func(args)
    except (assets.ModelNotFoundError, SettingsError) as exc:
        # Missing models, a flag combination no backend takes, an output made with other settings.
        print(f"facedist: {exc}", file=sys.stderr)
        return 2
    finally:
        runtime.disconnect()  # a local Ray this command started stops with it


if __name__ == "__main__":
    sys.exit(main())
