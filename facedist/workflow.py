"""`facedist run`: the whole flow on one command - extract, train, report.

storage -> Ray Data extraction -> coefficients table -> Ray Train (C-Net, then the classifiers
fed with C-Net aggregates) -> model bundles -> report. Local Ray and local storage by default;
--address and s3:// for a cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from facedist import runtime, storage
from facedist.extraction.config import ExtractConfig
from facedist.extraction.distributed import RayExtractConfig
from facedist.schema import LABEL_COLUMNS


@dataclass
class WorkflowConfig:
    images: str                     # folder, s3:// prefix or manifest
    out: str                        # folder or s3:// prefix: coefficients/, models/, report/
    # The extraction step's settings (the extractor, batches, resume, actors, dataset).
    extraction: RayExtractConfig = field(default_factory=lambda: WorkflowConfig.default_extraction())
    epochs: int | None = None       # classifier epochs; None: the task presets' (training.presets)
    cnet_epochs: int | None = None
    workers: int = 1                # Ray Train workers per task
    cpus_per_worker: float | None = None  # None: the CPUs free for training split among the workers
    report: bool = True
    report_folds: int = 3
    full_report: bool = False       # the report also trains the raw-image ResNet-34 baseline (slow on CPUs)
    report_seeds: int = 1
    report_synthetic: bool = True   # the report's synthetic C-Net check (known identities)
    address: str | None = None

    @staticmethod
    def default_extraction() -> RayExtractConfig:
        # Batches of 32, not ExtractConfig's 64: a few hundred images still make enough batches
        # to keep both default actors busy.
        return RayExtractConfig(extract=ExtractConfig(batch_size=32))


def _labelled(table, column: str) -> int:
    """How many distinct values a label column has among ok rows (0 when the table has no such column)."""
    if column not in table.column_names:
        return 0
    values = {v for v, s in zip(table.column(column).to_pylist(), table.column("status").to_pylist())
              if v is not None and s == "ok"}
    return len(values)


def few_photos_note(subjects, folds: int) -> str | None:
    """One line when people have too few photos for the identity preset's combinations
    (``subjects``: the ok rows', as sharded.scan_groups gives them)."""
    from facedist.training.presets import preset_config
    from facedist.training.tasks import combo_size_for

    return combo_size_for(subjects, preset_config("identity", folds=folds))[1] if len(subjects) else None


def _trained_line(task: str, summary: dict, seconds: float) -> str:
    from facedist.training.distributed import describe_best

    return f"      {task}: {describe_best(summary['best'])} ({seconds:.0f} s) -> {summary['bundle']}"


def run_workflow(config: WorkflowConfig, log=print) -> dict:
    from facedist.extraction.distributed import run_ray_extraction
    from facedist.reports.image import ReportConfig, bundle_checks, report_line, write_report_at
    from facedist.training import run_training
    from facedist.training.presets import preset_config, shipped_inputs
    from facedist.training.sharded import scan_groups

    started = time.perf_counter()
    runtime.connect(config.address)
    coeffs = storage.join(config.out, "coefficients")
    models = storage.join(config.out, "models")
    log(f"[1/3] extracting {config.images} -> {coeffs}")
    summary = run_ray_extraction(config.images, coeffs, config.extraction, address=config.address)

    table = storage.read_table(coeffs, columns=["status", *LABEL_COLUMNS])
    groups, subjects = scan_groups(coeffs)   # the descriptor columns file by file
    # Extraction is done by now, so the training workers may have the CPUs (torch threads follow).
    cpus = config.cpus_per_worker or max(1.0, float(runtime.training_cpus() // config.workers))
    # The report's first seed and split: each bundle is the report's fold 0 (bundle_checks).
    common = dict(data=coeffs, output=models, num_workers=config.workers, cpus_per_worker=cpus,
                  folds=config.report_folds, seed=ReportConfig.seed)
    trained = {}
    log(f"[2/3] training C-Net and the classifiers on Ray Train -> {models}")
    note = few_photos_note(subjects, config.report_folds)
    if note:
        log(f"      note: {note}")
    cnet_dir = storage.join(models, "cnet")
    # Identity and gender aggregate a person's images as TrainConfig.aggregate says (the mean by
    # default); C-Net's bundle is there for --aggregate cnet, and for its per-image confidences.
    # Each classifier on its preset's descriptor groups that this table has (shipped_inputs).
    tasks = [("cnet", None, {"epochs": config.cnet_epochs}),
             ("identity", "subject", {"cnet": cnet_dir, "epochs": config.epochs,
                                      "inputs": shipped_inputs("identity", groups)}),
             ("expression", "expression", {"epochs": config.epochs, "inputs": shipped_inputs("expression", groups)}),
             ("gender", "gender", {"cnet": cnet_dir, "epochs": config.epochs, "inputs": shipped_inputs("gender", groups)}),
             # Age (a regressor, split by person) where the images carry ages (a manifest's age column).
             ("age", "age", {"epochs": config.epochs, "inputs": shipped_inputs("age", groups)})]
    for task, column, extra in tasks:
        if column is not None and _labelled(table, column) < 2:
            log(f"      {task}: skipped, the images carry fewer than 2 {column} labels")
            continue
        task_started = time.perf_counter()
        # The report (below) trains each fold from the same presets: fold 0's row is this bundle.
        trained[task] = run_training(preset_config(task, **common, **extra))
        log(_trained_line(task, trained[task], time.perf_counter() - task_started))

    report_dir = None
    if config.report:
        report_dir = storage.join(config.out, "report")
        rows = "coefficients vs images" if config.full_report else "coefficients; --full-report adds images"
        log(f"[3/3] report ({config.report_folds}-fold protocol, {rows}) -> {report_dir}")
        results = write_report_at(report_dir, ReportConfig(
            data=coeffs, folds=config.report_folds, seeds=config.report_seeds, coeff_epochs=config.epochs,
            cnet_epochs=config.cnet_epochs, include_images=config.full_report, synthetic=config.report_synthetic),
            map_folds=map_on_ray)
        log(f"      {report_line(results)}")
        checks = bundle_checks(trained, results)
        for task, check in checks.items():
            log(f"      {task} bundle: validation accuracy {check['bundle']:.3f}, report {check['row']} "
                f"{check['low']:.3f}-{check['high']:.3f} over {config.report_folds} folds"
                + (f" x {config.report_seeds} seeds" if config.report_seeds > 1 else ""))

    result = {"extraction": summary, "coefficients": coeffs, "models": models, "report": report_dir,
              "trained": {k: {"bundle": v["bundle"], "best": {m: v["best"].get(m) for m in
                                                               ("epoch", "accuracy", "macro_f1", "mae", "loo_error_cnet", "loo_gain_vs_mean")}}
                          for k, v in trained.items()},
              "seconds": round(time.perf_counter() - started, 1)}
    if report_dir:
        result["bundle_checks"] = checks
    counts = summary["counts"]
    log(f"done in {result['seconds']} s: {summary['rows']} images (ok {counts.get('ok', 0)}, "
        f"no_face {counts.get('no_face', 0)}, error {counts.get('error', 0)}); coefficients in {coeffs}")
    if report_dir:
        log(f"  report: {report_dir} (table1_identity.md, table2_expression.md, table3_speed.md, confusion_*.png)")
    log(f"  serve it: facedist serve --models {models}")
    return result


def map_on_ray(fn, jobs: list[tuple]) -> list:
    """[fn(*job) for job in jobs], each job a Ray task of one CPU (one torch thread), in order. The
    report's folds are independent: on 2 cores two single-threaded folds at once beat one fold
    on two threads, and on a cluster they spread over its nodes."""
    ray = runtime.connect()
    task = ray.remote(num_cpus=1, max_retries=1)(fn)
    return ray.get([task.remote(*job) for job in jobs])
