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
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from facedist.schema import YALE_EXPRESSIONS
from facedist.training.engine import TrainConfig, fit


@dataclass
class ReportConfig:
    data: str                              # coefficients table (local or s3://)
    out: str = "results"
    folds: int = 3
    seed: int = 0
    coeff_epochs: int = 40
    cnet_epochs: int = 30
    image_epochs: int = 15
    image_size: int = 224                  # the image baseline's crops: ResNet-34's standard input
    expressions: tuple[str, ...] = YALE_EXPRESSIONS
    include_images: bool = True
    synthetic: bool = True


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "folds": [float(v) for v in arr]}


def _row(result) -> dict:
    m = result.best_metrics
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "confusion": m["confusion"],
            "seconds_per_input": float(np.mean([h["seconds_per_input"] for h in result.history])),
            "epochs_run": len(result.history), "best_epoch": m["epoch"], "n_val": m["n_val"]}


def run_fold(data, fold: int, config: ReportConfig, crops=None, log=print) -> dict:
    from facedist.training.tasks import CNetTask, cnet_confidences, make_classifier_task

    base = TrainConfig(task="identity", folds=config.folds, fold=fold, seed=config.seed)
    out: dict = {"fold": fold}
    # C-Net on this fold's training images only.
    cnet_cfg = replace(base, task="cnet", epochs=config.cnet_epochs, lr=3e-3, batch_size=16, set_size=6,
                       steps_per_epoch=10, patience=8)
    cnet_task = CNetTask(cnet_cfg, data)
    cnet_fit = fit(cnet_task, cnet_cfg)
    out["cnet"] = {k: cnet_fit.best_metrics[k] for k in ("loo_error_cnet", "loo_error_mean", "loo_gain_vs_mean")}
    bundle = cnet_task.bundle(cnet_fit.best_state, cnet_fit.best_metrics)
    from facedist.training.bundle import build_model
    model = build_model(bundle["model_config"])
    model.load_state_dict(bundle["state_dict"])
    confidences = cnet_confidences(data, {"model": model.eval(), "input_norm": bundle["input_norm"]})
    log(f"fold {fold} cnet {out['cnet']}")

    id_cfg = replace(base, epochs=config.coeff_epochs, batch_size=32, patience=12)
    for name, conf in (("identity_cnet", confidences), ("identity_mean", None)):
        cfg = replace(id_cfg, aggregate="cnet" if conf is not None else "mean")
        out[name] = _row(fit(make_classifier_task(cfg, data, conf), cfg))
        log(f"fold {fold} {name} acc={out[name]['accuracy']:.3f}")
    expr_cfg = replace(base, task="expression", epochs=config.coeff_epochs, batch_size=16, patience=12,
                       labels=list(config.expressions))
    out["expression"] = _row(fit(make_classifier_task(expr_cfg, data), expr_cfg))
    log(f"fold {fold} expression acc={out['expression']['accuracy']:.3f}")
    if config.include_images:
        from facedist.training.image_baseline import make_image_task

        for name, task in (("image_identity", "image_identity"), ("image_expression", "image_expression")):
            cfg = replace(base, task=task, epochs=config.image_epochs, batch_size=16, patience=8,
                          image_size=config.image_size,
                          labels=list(config.expressions) if task == "image_expression" else None)
            out[name] = _row(fit(make_image_task(cfg, data, crops), cfg))
            log(f"fold {fold} {name} acc={out[name]['accuracy']:.3f}")
    return out


def synthetic_cnet_check(seed: int = 0, epochs: int = 30) -> dict:
    """(a): C-Net trained weakly (no identities) on synthetic sets; error to the true identity on
    held-out people, in prior-std units, for sets of 3 images: C-Net vs plain mean."""
    from facedist.training.data import table_to_data
    from facedist.training.synthetic import SyntheticConfig, _tddfa_prior, synthetic_table
    from facedist.training.tasks import CNetTask

    table, truth = synthetic_table(SyntheticConfig(n_people=120, images_per_person=10, seed=seed))
    data = table_to_data(table)
    std_id, _ = _tddfa_prior(data.alpha.shape[1], data.beta.shape[1])
    cfg = TrainConfig(task="cnet", epochs=epochs, lr=3e-3, batch_size=32, set_size=6, steps_per_epoch=10,
                      patience=8, folds=4, fold=0, seed=seed)
    task = CNetTask(cfg, data, alpha_true=truth["alpha_true"], split="person")
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


def write_report(config: ReportConfig, log=print) -> dict:
    """Run the protocol and write results/ (local directory). Returns the results dict."""
    from facedist.training.data import encode_labels, load_data

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(config.data)
    crops = None
    if config.include_images:
        from facedist.training.image_baseline import load_crops
        crops = load_crops(data, config.image_size)
    folds = [run_fold(data, k, config, crops, log) for k in range(config.folds)]
    results: dict = {"data": config.data, "rows_used": len(data), "rows_skipped": data.skipped,
                     "backend": data.layout.backend, "folds": config.folds, "per_fold": folds}
    keys = [k for k in folds[0] if k not in ("fold", "cnet")]
    results["summary"] = {k: {m: _summary([f[k][m] for f in folds]) for m in ("accuracy", "macro_f1",
                                                                               "seconds_per_input")} for k in keys}
    results["summary"]["cnet_loo_gain_vs_mean"] = _summary([f["cnet"]["loo_gain_vs_mean"] for f in folds])
    if config.synthetic:
        results["cnet_synthetic"] = synthetic_cnet_check(config.seed)
        (out / "cnet_synthetic.json").write_text(json.dumps(results["cnet_synthetic"], indent=2))
    # Confusion matrices summed over folds.
    _, subjects = encode_labels(data.subject)
    for key, labels in (("expression", list(config.expressions)), ("identity_cnet", subjects)):
        matrix = np.sum([np.asarray(f[key]["confusion"]) for f in folds], 0)
        name = "expression" if key == "expression" else "identity"
        (out / f"confusion_{name}.json").write_text(json.dumps({"labels": labels, "matrix": matrix.tolist()}))
        _plot_confusion(matrix, labels, f"{name} ({key}), {config.folds}-fold", out / f"confusion_{name}.png")
    s = results["summary"]
    fmt = lambda k, m: f"{s[k][m]['mean']:.3f} ± {s[k][m]['std']:.3f}" if k in s else "n/a"  # noqa: E731
    table1 = ["| identity input | accuracy | macro-F1 |", "|---|---|---|"]
    for key, name in (("identity_cnet", "3DMM identity, C-Net aggregate of 3 images"),
                      ("identity_mean", "3DMM identity, mean of 3 images"),
                      ("image_identity", "images (ResNet-34 2-D), mean logits of the same 3")):
        table1.append(f"| {name} | {fmt(key, 'accuracy')} | {fmt(key, 'macro_f1')} |")
    table2 = ["| expression input | accuracy | macro-F1 |", "|---|---|---|",
              f"| 3DMM expression coefficients (ResNet-32 1-D) | {fmt('expression', 'accuracy')} | "
              f"{fmt('expression', 'macro_f1')} |",
              f"| images (ResNet-34 2-D) | {fmt('image_expression', 'accuracy')} | "
              f"{fmt('image_expression', 'macro_f1')} |",
              f"\nchance: {1 / len(config.expressions):.3f}"]
    table3 = ["| model | training seconds per input |", "|---|---|"]
    for key in ("identity_cnet", "expression", "image_identity", "image_expression"):
        if key in s:
            table3.append(f"| {key} | {s[key]['seconds_per_input']['mean']:.5f} |")
    if "image_identity" in s:
        ratio = s["image_identity"]["seconds_per_input"]["mean"] / s["identity_cnet"]["seconds_per_input"]["mean"]
        results["speedup_identity"] = ratio
        table3.append(f"\nimage / coefficient time per input (identity): {ratio:.1f}x")
    header = f"{config.folds}-fold, split by image, {len(data)} usable rows ({data.skipped} skipped), backend {data.layout.backend}\n\n"
    (out / "table1_identity.md").write_text(header + "\n".join(table1) + "\n")
    (out / "table2_expression.md").write_text(header + "\n".join(table2) + "\n")
    (out / "table3_speed.md").write_text(header + "\n".join(table3) + "\n")
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
