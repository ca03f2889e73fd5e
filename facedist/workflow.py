"""`facedist run`: the whole flow on one command - extract, train, report.

storage -> Ray Data extraction -> coefficients table -> Ray Train (C-Net, then the classifiers
fed with C-Net aggregates) -> model bundles -> report. Local Ray and local storage by default;
--address and s3:// for a cluster.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from facedist import runtime, storage
from facedist.extractors import DEFAULT_BACKEND, DEFAULT_TEXTURE_BASIS
from facedist.schema import INPUT_GROUPS, LABEL_COLUMNS


@dataclass
class WorkflowConfig:
    images: str                     # folder, s3:// prefix or manifest
    out: str                        # folder or s3:// prefix: coefficients/, models/, report/
    backend: str = DEFAULT_BACKEND
    detector: str = "faceboxes"
    landmarks: str | None = None    # None: the backend's own
    texture: bool = True            # sample face colour on the fitted mesh
    texture_basis: str | None = DEFAULT_TEXTURE_BASIS  # tex_coeffs' basis (ExtractConfig.texture_basis)
    face_embedding: bool = True     # ExtractConfig.face_embedding
    face_attributes: bool = True    # ExtractConfig.face_attributes
    dataset: str = "auto"
    resume: bool = True             # False: replace the coefficients an earlier run left in out/
    actors: int = 2
    batch_size: int = 32
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


def _labelled(table, column: str) -> int:
    """How many distinct values a label column has among ok rows (0 when the table has no such column)."""
    if column not in table.column_names:
        return 0
    values = {v for v, s in zip(table.column(column).to_pylist(), table.column("status").to_pylist())
              if v is not None and s == "ok"}
    return len(values)


def filled_groups(table) -> tuple[str, ...]:
    """The descriptor groups (schema.INPUT_GROUPS) that every ok row of ``table`` has."""
    import pyarrow.compute as pc

    ok = pc.equal(table.column("status"), "ok")
    return tuple(name for name, column in INPUT_GROUPS.items() if column in table.column_names
                 and pc.sum(ok).as_py() and table.filter(ok).column(column).null_count == 0)


def few_photos_note(table, folds: int) -> str | None:
    """One line when people have too few photos for the identity preset's combinations."""
    import numpy as np

    from facedist.training.presets import preset_config
    from facedist.training.tasks import combo_size_for

    ok = [s for s, status in zip(table.column("subject").to_pylist(), table.column("status").to_pylist())
          if status == "ok" and s is not None]
    return combo_size_for(np.asarray(ok, dtype=object), preset_config("identity", folds=folds))[1] if ok else None


def _trained_line(task: str, summary: dict, seconds: float) -> str:
    from facedist.training.distributed import describe_best

    return f"      {task}: {describe_best(summary['best'])} ({seconds:.0f} s) -> {summary['bundle']}"


def report_line(results: dict) -> str:
    """The report's headline figures on one line (the tables hold the rest)."""
    s = results["summary"]

    def acc(key: str) -> str:
        return f"{s[key]['accuracy']['mean']:.3f}" if key in s else "n/a"

    def extra(key: str, name: str) -> str:
        return f", {name} {acc(key)}" if key in s else ""

    return (f"identity α C-Net {acc('identity_cnet')}, mean {acc('identity_mean')}"
            f"{extra('identity_shipped', 'shipped')}{extra('image_identity', 'images')}; expression β {acc('expression')}"
            f"{extra('expression_shipped', 'shipped')}{extra('image_expression', 'images')}"
            + (f"; gender α {acc('gender')}{extra('gender_shipped', 'shipped')}" if "gender" in s else "")
            + f" (accuracy, {results['folds']}-fold mean; {results['seconds']:.0f} s)")


def report_row(task: str, aggregate: str = "mean") -> str:
    """The report's row that measures a shipped bundle of ``task``."""
    return {"identity": f"identity_{aggregate}"}.get(task, task)


def bundle_checks(trained: dict, results: dict) -> dict:
    """Each shipped classifier's validation accuracy next to the range of its report row (the
    bundle is fold 0 of the report's first seed, trained from the same preset)."""
    checks = {}
    for task, summary in trained.items():
        row = f"{task}_shipped"  # the preset's own row, where it differs from the paper's
        if row not in results["summary"]:
            row = report_row(task, summary.get("aggregate", "mean"))
        accuracy = summary["best"].get("accuracy")
        if accuracy is None or row not in results["summary"]:
            continue
        folds = results["summary"][row]["accuracy"]["folds"]
        checks[task] = {"bundle": float(accuracy), "row": row, "low": min(folds), "high": max(folds), "n": len(folds)}
    return checks


def run_workflow(config: WorkflowConfig, log=print) -> dict:
    from facedist.pipeline import ExtractConfig
    from facedist.ray_extract import RayExtractConfig, run_ray_extraction
    from facedist.report import ReportConfig
    from facedist.training import run_training
    from facedist.training.presets import preset_config, shipped_inputs

    started = time.perf_counter()
    runtime.connect(config.address)
    coeffs = storage.join(config.out, "coefficients")
    models = storage.join(config.out, "models")
    log(f"[1/3] extracting {config.images} -> {coeffs}")
    summary = run_ray_extraction(
        config.images, coeffs,
        RayExtractConfig(extract=ExtractConfig(backend=config.backend, detector=config.detector,
                                               landmarks=config.landmarks, texture=config.texture,
                                               texture_basis=config.texture_basis, batch_size=config.batch_size,
                                               face_embedding=config.face_embedding,
                                               face_attributes=config.face_attributes,
                                               resume=config.resume),
                         actors=config.actors, dataset=config.dataset),
        address=config.address)

    table = storage.read_table(coeffs, columns=["status", *LABEL_COLUMNS, *INPUT_GROUPS.values()])
    groups = filled_groups(table)
    # Extraction is done by now, so the training workers may have the CPUs (torch threads follow).
    cpus = config.cpus_per_worker or max(1.0, float(runtime.training_cpus() // config.workers))
    # The report's first seed and split: each bundle is the report's fold 0 (bundle_checks).
    common = dict(data=coeffs, output=models, num_workers=config.workers, cpus_per_worker=cpus,
                  folds=config.report_folds, seed=ReportConfig.seed)
    trained = {}
    log(f"[2/3] training C-Net and the classifiers on Ray Train -> {models}")
    note = few_photos_note(table, config.report_folds)
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
            cnet_epochs=config.cnet_epochs, include_images=config.full_report, synthetic=config.report_synthetic))
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


def write_report_at(out_uri: str, config, log=None) -> dict:
    """facedist.report.write_report into out_uri, a local folder or an s3:// prefix (rendered in
    a temporary folder, then uploaded). config: a ReportConfig; its `out` is replaced. The
    per-fold lines go to runtime.details() unless log is given."""
    from dataclasses import replace

    from facedist.report import write_report

    log = log or runtime.details()
    if not storage.is_s3(out_uri):
        return write_report(replace(config, out=out_uri), log=log)
    with tempfile.TemporaryDirectory() as local:  # the report renders locally, then goes up
        results = write_report(replace(config, out=local), log=log)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                storage.write_bytes(storage.join(out_uri, str(path.relative_to(local))), path.read_bytes())
    return results
