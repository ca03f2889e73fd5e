"""`facedist report`: the paper's tables on a real coefficients table, k-fold, written to results/.

Per fold (split by image, stratified by subject / expression; see training.tasks):
  C-Net trained on the fold's training images only -> identity classifier (1-D ResNet-34) on
  C-Net aggregates of C(n, 3) combinations, the same classifier on plain-mean aggregates, and
  the image baseline (2-D ResNet-34 on crops, combination = mean logits) on the same split;
  expression: 1-D ResNet-32 on expression coefficients vs the image baseline on the same folds.
Plus (a) the synthetic check: C-Net vs mean identity error to the known truth.

results/
  results.json                everything below, machine-readable (per fold and mean/std)
  table1_identity.md          accuracy / macro-F1: C-Net aggregates, mean aggregates, images
  table2_expression.md        accuracy / macro-F1: expression coefficients vs images
  table3_speed.md             training seconds per input, coefficients vs images
  confusion_expression.json/.png, confusion_identity.json/.png   summed over folds
  cnet_synthetic.json         error to truth, C-Net vs mean
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facedist import runtime, storage
from facedist.training.engine import TrainConfig, fit


# The accuracy tables write_report writes (table3_speed.md holds this machine's seconds).
ACCURACY_TABLES = ("table1_identity.md", "table2_expression.md", "table4_gender.md")


@dataclass
class ReportConfig:
    """Training settings left None come from the task presets (training.presets): the report
    trains what `facedist train` and `facedist run` train."""
    data: str                              # coefficients table (local or s3://)
    out: str = "results"
    folds: int = 3
    seed: int = 0                          # the first seed; seeds > 1 repeat the folds with seed + 1, ...
    seeds: int = 1
    coeff_epochs: int | None = None        # None: the presets'
    cnet_epochs: int | None = None
    image_epochs: int | None = None
    image_size: int | None = None          # the image baseline's crops (preset: 224, ResNet-34's input)
    expressions: tuple[str, ...] | None = None  # restrict/order the classes; None: every label in the table
    include_images: bool = True
    synthetic: bool = True
    # At most this many rows, whole people drawn by seed (training.data.sample_people; None or 0:
    # every row): the protocol trains 9 models per fold, and on a 1,008-row table takes 7 minutes
    # on 2 cores (docs/benchmarks.md), so a 100,000-row table is reported on a sample, and says so.
    max_rows: int | None = 1000


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "folds": [float(v) for v in arr]}


def _row(result) -> dict:
    m = result.best_metrics
    # No confusion matrix above tasks.CONFUSION_MAX_CLASSES classes (a table of many people).
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "confusion": m.get("confusion"),
            "seconds_per_input": float(np.mean([h["seconds_per_input"] for h in result.history])),
            "epochs_run": len(result.history), "best_epoch": m["epoch"], "n_val": m["n_val"]}


def run_fold(data, fold: int, config: ReportConfig, crops=None, log=print, seed: int | None = None) -> dict:
    from facedist.schema import DEFAULT_INPUTS, inputs_label
    from facedist.training.bundle import build_model
    from facedist.training.presets import preset_config, shipped_inputs
    from facedist.training.tasks import CNetTask, cnet_confidences, make_classifier_task, task_inputs

    seed = config.seed if seed is None else seed
    split = {"folds": config.folds, "fold": fold, "seed": seed}
    out: dict = {"fold": fold, "seed": seed}
    # C-Net on this fold's training images only.
    cnet_cfg = preset_config("cnet", epochs=config.cnet_epochs, **split)
    cnet_task = CNetTask(cnet_cfg, data)
    cnet_fit = fit(cnet_task, cnet_cfg)
    out["cnet"] = {k: cnet_fit.best_metrics[k] for k in ("loo_error_cnet", "loo_error_mean", "loo_gain_vs_mean")}
    bundle = cnet_task.bundle(cnet_fit.best_state, cnet_fit.best_metrics)
    model = build_model(bundle["model_config"])
    model.load_state_dict(bundle["state_dict"])
    confidences = cnet_confidences(data, {"model": model.eval(), "input_norm": bundle["input_norm"]})
    log(f"fold {fold} cnet {out['cnet']}")

    # The paper's rows: its 1-D ResNets on the coefficients alone (α for identity and gender, β
    # for expression), whatever the presets ship.
    paper = lambda task: {"head": "resnet", "inputs": DEFAULT_INPUTS[task]}  # noqa: E731
    for name, conf in (("identity_cnet", confidences), ("identity_mean", None)):
        cfg = preset_config("identity", epochs=config.coeff_epochs, aggregate="cnet" if conf is not None else "mean",
                            **paper("identity"), **split)
        out[name] = _row(fit(make_classifier_task(cfg, data, conf), cfg))
        log(f"fold {fold} {name} acc={out[name]['accuracy']:.3f}")
    expressions = list(config.expressions) if config.expressions else None
    tasks = ["expression"]
    if data.gender is not None and len({g for g in data.gender if g is not None}) >= 2:
        tasks.append("gender")
    for task in tasks:
        cfg = preset_config(task, epochs=config.coeff_epochs, labels=expressions if task == "expression" else None,
                            **paper(task), **split)
        out[task] = _row(fit(make_classifier_task(cfg, data), cfg))
        log(f"fold {fold} {task} acc={out[task]['accuracy']:.3f}")
    # The shipped models: each task's preset (its inputs and head), where it differs from the paper's
    # row; epochs as the coefficient classifiers' (`--coeff-epochs`; `facedist run --epochs` trains
    # the shipped bundles with them too, and bundle_checks sets the two side by side).
    for task in ("identity", *tasks):
        cfg = preset_config(task, epochs=config.coeff_epochs, labels=expressions if task == "expression" else None,
                            inputs=shipped_inputs(task, data.available_inputs()), **split)
        if (cfg.head, task_inputs(cfg)) == ("resnet", DEFAULT_INPUTS[task]):
            continue
        key = f"{task}_shipped"
        out[key] = {**_row(fit(make_classifier_task(cfg, data, confidences if cfg.aggregate == "cnet" else None),
                               cfg)), "inputs": list(task_inputs(cfg)), "head": cfg.head}
        log(f"fold {fold} {key} ({inputs_label(task_inputs(cfg))}, {cfg.head}) acc={out[key]['accuracy']:.3f}")
    if config.include_images:
        from facedist.training.image_baseline import make_image_task

        for name in ("image_identity", "image_expression"):
            cfg = preset_config(name, epochs=config.image_epochs, image_size=config.image_size,
                                labels=expressions if name == "image_expression" else None, **split)
            out[name] = _row(fit(make_image_task(cfg, data, crops), cfg))
            log(f"fold {fold} {name} acc={out[name]['accuracy']:.3f}")
    return out


def _quiet(_message: str) -> None:
    """A fold run elsewhere logs nothing (its lines would interleave); write_report logs its rows."""


def synthetic_cnet_check(seed: int = 0, epochs: int = 30) -> dict:
    """(a): C-Net trained weakly (no identities) on synthetic sets; error to the true identity on
    held-out people, in prior-std units, for sets of 3 images: C-Net vs plain mean."""
    from facedist.training.data import table_to_data
    from facedist.training.synthetic import SyntheticConfig, _tddfa_prior, synthetic_table
    from facedist.training.tasks import CNetTask

    table, truth = synthetic_table(SyntheticConfig(n_people=120, images_per_person=10, seed=seed))
    data = table_to_data(table)
    std_id, _ = _tddfa_prior(data.id_coeffs.shape[1], data.exp_coeffs.shape[1])
    cfg = TrainConfig(task="cnet", epochs=epochs, lr=3e-3, batch_size=32, set_size=6, steps_per_epoch=10,
                      patience=8, folds=4, fold=0, seed=seed)
    task = CNetTask(cfg, data, true_id_coeffs=truth["true_id_coeffs"], split="person")
    result = fit(task, cfg)
    m = result.best_metrics
    scale = float(np.sqrt(np.mean(std_id ** 2)))  # report in units of the mean prior std
    return {"truth_error_cnet": m["truth_error_cnet"] / scale, "truth_error_mean": m["truth_error_mean"] / scale,
            "relative_gain": 1 - m["truth_error_cnet"] / m["truth_error_mean"],
            "loo_error_cnet": m["loo_error_cnet"], "loo_error_mean": m["loo_error_mean"],
            "val_people": int(len(task.val_sets.groups())), "best_epoch": m["epoch"]}


def _plot_confusion(matrix, labels, title, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(config: ReportConfig, log=print, map_folds=None) -> dict:
    """Run the protocol and write results/ (local directory). Returns the results dict.
    map_folds(fn, jobs) -> [fn(*job) for job in jobs], in order: how the folds run (here, one
    after another; `facedist run` passes one that spreads them over its Ray cluster)."""
    from facedist.training.data import TRAINING_COLUMNS, encode_labels, load_data, sample_people

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data, note = sample_people(load_data(config.data, columns=TRAINING_COLUMNS), config.max_rows, config.seed)
    if note:
        log(f"note: {note}")
    crops = None
    if config.include_images:
        from facedist.training.image_baseline import load_crops
        from facedist.training.presets import preset_value

        crops = load_crops(data, config.image_size or preset_value("image_identity", "image_size"))
    seeds = range(config.seed, config.seed + config.seeds)
    jobs = [(k, seed) for seed in seeds for k in range(config.folds)]
    if map_folds is None:
        folds = [run_fold(data, k, config, crops, log, seed=seed) for k, seed in jobs]
    else:
        folds = map_folds(lambda k, seed: run_fold(data, k, config, crops, _quiet, seed=seed), jobs)
        for f in folds:
            log(f"fold {f['fold']} seed {f['seed']}: " + ", ".join(
                f"{k} {v['accuracy']:.3f}" for k, v in f.items() if isinstance(v, dict) and "accuracy" in v))
    results: dict = {"data": config.data, "rows_used": len(data), "rows_skipped": data.skipped,
                     "backend": data.layout.backend, "folds": config.folds, "seeds": list(seeds), "per_fold": folds}
    keys = [k for k in folds[0] if k not in ("fold", "seed", "cnet")]
    results["summary"] = {k: {m: _summary([f[k][m] for f in folds]) for m in ("accuracy", "macro_f1",
                                                                               "seconds_per_input")} for k in keys}
    results["summary"]["cnet_loo_gain_vs_mean"] = _summary([f["cnet"]["loo_gain_vs_mean"] for f in folds])
    if config.synthetic:
        results["cnet_synthetic"] = synthetic_cnet_check(config.seed)
        (out / "cnet_synthetic.json").write_text(json.dumps(results["cnet_synthetic"], indent=2))
    # Confusion matrices summed over folds.
    _, subjects = encode_labels(data.subject)
    expressions = list(config.expressions) if config.expressions else encode_labels(data.expression)[1]
    for key, labels in (("expression", expressions), ("identity_cnet", subjects)):
        if any(f[key]["confusion"] is None for f in folds):
            continue
        matrix = np.sum([np.asarray(f[key]["confusion"]) for f in folds], 0)
        name = "expression" if key == "expression" else "identity"
        (out / f"confusion_{name}.json").write_text(json.dumps({"labels": labels, "matrix": matrix.tolist()}))
        _plot_confusion(matrix, labels, f"{name} ({key}), {config.folds}-fold", out / f"confusion_{name}.png")
    s = results["summary"]
    fmt = lambda k, m: f"{s[k][m]['mean']:.3f} ± {s[k][m]['std']:.3f}"  # noqa: E731
    # Rows of what ran: --no-images leaves the image baseline out of the tables, not as "n/a".
    from facedist.schema import inputs_label
    from facedist.training.presets import preset_config
    from facedist.training.tasks import combo_size_for

    size, note = combo_size_for(data.subject, preset_config("identity", folds=config.folds))
    if note:
        log(f"note: {note}")
        results["note"] = note
    of = "single images" if size == 1 else f"{size} images"

    def shipped(task: str) -> str:
        f = folds[0][f"{task}_shipped"]
        return f"shipped model: {inputs_label(tuple(f['inputs']))}, {f['head']} head"

    table1 = ["| identity input | accuracy | macro-F1 |", "|---|---|---|"]
    for key, name in (("identity_cnet", f"3DMM identity, C-Net aggregate of {of}"),
                      ("identity_mean", f"3DMM identity, mean of {of}"),
                      ("identity_shipped", lambda: f"{shipped('identity')}, mean of {of}"),
                      ("image_identity", f"images (ResNet-34 2-D), mean logits of the same {of}")):
        if key in s:
            table1.append(f"| {name() if callable(name) else name} | {fmt(key, 'accuracy')} | {fmt(key, 'macro_f1')} |")
    table2 = ["| expression input | accuracy | macro-F1 |", "|---|---|---|"]
    for key, name in (("expression", "3DMM expression coefficients (ResNet-32 1-D)"),
                      ("expression_shipped", lambda: shipped("expression")),
                      ("image_expression", "images (ResNet-34 2-D)")):
        if key in s:
            table2.append(f"| {name() if callable(name) else name} | {fmt(key, 'accuracy')} | {fmt(key, 'macro_f1')} |")
    table2.append(f"\nchance: {1 / len(expressions):.3f}")
    table3 = ["| model | training seconds per input |", "|---|---|"]
    for key in ("identity_cnet", "expression", "image_identity", "image_expression"):
        if key in s:
            table3.append(f"| {key} | {s[key]['seconds_per_input']['mean']:.5f} |")
    if "image_identity" in s:
        ratio = s["image_identity"]["seconds_per_input"]["mean"] / s["identity_cnet"]["seconds_per_input"]["mean"]
        results["speedup_identity"] = ratio
        table3.append(f"\nimage / coefficient time per input (identity): {ratio:.1f}x")
    split = f"{config.folds}-fold" + (f" x {config.seeds} seeds" if config.seeds > 1 else f", seed {config.seed}")
    header = (f"{split}, split by image, {len(data)} usable rows ({data.skipped} skipped), "
              f"backend {data.layout.backend}\n\n")
    (out / "table1_identity.md").write_text(header + "\n".join(table1) + "\n")
    (out / "table2_expression.md").write_text(header + "\n".join(table2) + "\n")
    if "gender" in s:
        table4 = ["| gender input | accuracy | macro-F1 |", "|---|---|---|",
                  f"| 3DMM identity coefficients (ResNet-34 1-D), people split | {fmt('gender', 'accuracy')} | "
                  f"{fmt('gender', 'macro_f1')} |"]
        if "gender_shipped" in s:
            table4.append(f"| {shipped('gender')}, people split | {fmt('gender_shipped', 'accuracy')} | "
                          f"{fmt('gender_shipped', 'macro_f1')} |")
        (out / "table4_gender.md").write_text(header.replace("split by image", "split by person") +
                                               "\n".join(table4) + "\n")
    # Seconds are a measurement of this machine: the one table a rerun does not reproduce.
    (out / "table3_speed.md").write_text(header + "\n".join(table3) + "\n")
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


# ---- for `facedist run` and `facedist report`: where the report goes, its headline line ------

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


def write_report_at(out_uri: str, config, log=None, map_folds=None) -> dict:
    """write_report into out_uri, a local folder or an s3:// prefix (rendered in
    a temporary folder, then uploaded). config: a ReportConfig; its `out` is replaced. The
    per-fold lines go to runtime.details() unless log is given. map_folds: write_report's
    (e.g. workflow.map_on_ray); None runs the folds here, one after another."""
    from dataclasses import replace

    log = log or runtime.details()
    if not storage.is_s3(out_uri):
        return write_report(replace(config, out=out_uri), log=log, map_folds=map_folds)
    with tempfile.TemporaryDirectory() as local:  # the report renders locally, then goes up
        results = write_report(replace(config, out=local), log=log, map_folds=map_folds)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                storage.write_bytes(storage.join(out_uri, str(path.relative_to(local))), path.read_bytes())
    return results
