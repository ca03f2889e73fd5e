"""Fast proxy for "does C-Net aggregation help identity on real faces?" (seconds per fold).

For each of the report's k folds (facedist.training.data.image_folds, split by image): train C-Net
weakly (sets of one person's training images, exactly as facedist.reports.image does), then aggregate
C(n, 3) combinations of each subject's images by C-Net and by the plain mean, whiten within class
on the training combinations (as the classifiers do) and classify every validation combination by
the nearest class mean of the training combinations. Same split, same combinations for both aggregations; only
the weights differ. Also a (tiny, noisy) check on people C-Net never saw. Optionally (--synthetic) the synthetic check (a): error to the true identity
on held-out people, C-Net vs mean.

    .venv/bin/python benchmarks/cnet_identity_proxy.py --data /tmp/yale_tddfa.parquet --synthetic

Writes benchmarks/results/cnet_identity_proxy.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from facedist.features import Standardizer
from facedist.models.cnet import aggregate_identity
from facedist.training.data import group_combinations, image_folds, load_data
from facedist.training.engine import TrainConfig, fit
from facedist.training.tasks import CNetTask, cnet_confidences


def nearest_mean_accuracy(x_train, y_train, x_val, y_val) -> float:
    # The classifiers' input normalisation: whitened within class on the training combinations.
    norm = Standardizer.fit(x_train, y_train)
    x_train, x_val = norm(x_train), norm(x_val)
    classes = np.array(sorted(set(y_train.tolist())))
    centres = np.stack([x_train[y_train == c].mean(0) for c in classes])
    pred = classes[((x_val[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == y_val).mean())


def aggregates(data, index, confidences, seed: int, max_combos: int = 120):
    combos, owners = group_combinations(data.subject.astype(str), index, 3, max_combos, seed)
    id_coeffs = torch.as_tensor(data.id_coeffs[combos])
    conf = None if confidences is None else torch.as_tensor(confidences[combos])
    return aggregate_identity(id_coeffs, conf).numpy(), owners.astype(str)


def train_cnet(data, fold: int, folds: int, seed: int, epochs: int, split: str = "image", **task_kwargs):
    # Same settings as facedist.reports.image.run_fold.
    cfg = TrainConfig(task="cnet", folds=folds, fold=fold, seed=seed, epochs=epochs, lr=3e-3, batch_size=16,
                      set_size=6, steps_per_epoch=10, patience=8)
    task = CNetTask(cfg, data, split=split, **task_kwargs)
    result = fit(task, cfg)
    model = task.build_model()
    model.load_state_dict(result.best_state)
    conf = cnet_confidences(data, {"model": model.eval(), "input_norm": task.norm.to_dict()})
    return conf, result.best_metrics


def run_fold(data, fold: int, folds: int, seed: int, epochs: int, **task_kwargs) -> dict:
    started = time.perf_counter()
    conf, m = train_cnet(data, fold, folds, seed, epochs, **task_kwargs)
    split = image_folds(data.subject, folds, seed)
    train_idx, val_idx = np.flatnonzero(split != fold), np.flatnonzero(split == fold)
    out = {"fold": fold, "loo_gain_vs_mean": m["loo_gain_vs_mean"], "best_epoch": m["epoch"]}
    for name, c in (("cnet", conf), ("mean", None)):
        x_tr, y_tr = aggregates(data, train_idx, c, seed)
        x_va, y_va = aggregates(data, val_idx, c, seed + 1)
        out[f"acc_{name}"] = nearest_mean_accuracy(x_tr, y_tr, x_va, y_va)
    log_c = np.log(conf)
    out["log_conf_std_within_dim"] = float(log_c.std(0).mean())
    out["conf_range"] = [float(conf.min()), float(conf.max())]
    out["seconds"] = time.perf_counter() - started
    return out


def run_unseen_people_fold(data, fold: int, folds: int, seed: int, epochs: int, **task_kwargs) -> dict:
    """Generalisation to new people: C-Net trained on the other folds' *people* (CNetTask
    split="person"), then the same nearest-class-mean test among the held-out people only, their
    images split 2:1 into enrolment/query (image_folds)."""
    conf, m = train_cnet(data, fold, folds, seed, epochs, split="person", **task_kwargs)
    subjects = np.array(sorted(set(data.subject.astype(str))))
    held_out = set(subjects[np.arange(len(subjects)) % folds == fold])  # CNetTask's person split
    people = np.flatnonzero([s in held_out for s in data.subject.astype(str)])
    split = image_folds(data.subject[people], 3, seed)
    enrol, query = people[split != 0], people[split == 0]
    out = {"fold": fold, "people": len(held_out), "loo_gain_vs_mean": m["loo_gain_vs_mean"]}
    for name, c in (("cnet", conf), ("mean", None)):
        x_tr, y_tr = aggregates(data, enrol, c, seed)
        x_va, y_va = aggregates(data, query, c, seed + 1)
        out[f"acc_{name}"] = nearest_mean_accuracy(x_tr, y_tr, x_va, y_va)
    return out


def synthetic_check(seed: int = 0, epochs: int = 30) -> dict:
    from facedist.reports.image import synthetic_cnet_check

    return synthetic_cnet_check(seed, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/yale_tddfa.parquet")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--synthetic", action="store_true", help="also run the synthetic check (a)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "cnet_identity_proxy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(args.data)
    results = {"data": args.data, "n_images": len(data), "folds": []}
    for fold in range(args.folds):
        row = run_fold(data, fold, args.folds, args.seed, args.epochs)
        print(json.dumps(row), flush=True)
        results["folds"].append(row)
    for name in ("cnet", "mean"):
        accs = [f[f"acc_{name}"] for f in results["folds"]]
        results[f"acc_{name}_mean"], results[f"acc_{name}_std"] = float(np.mean(accs)), float(np.std(accs))
    results["cnet_minus_mean_per_fold"] = [f["acc_cnet"] - f["acc_mean"] for f in results["folds"]]
    # New people (tiny: ~5 people per fold, ~1 query combination each), a sanity check only.
    results["unseen_people"] = [run_unseen_people_fold(data, fold, args.folds, args.seed, args.epochs)
                                for fold in range(args.folds)]
    print(json.dumps(results["unseen_people"]), flush=True)
    # The loss before the consistency term (LOO landmarks + weak shrinkage), same splits.
    from facedist.training.cnet import CNetLossConfig

    old = CNetLossConfig(spread_weight=0.001, consistency_weight=0.0)
    results["loo_only_loss"] = [{k: row[k] for k in ("fold", "acc_cnet", "acc_mean", "loo_gain_vs_mean")}
                                for row in (run_fold(data, fold, args.folds, args.seed, args.epochs, loss_config=old)
                                            for fold in range(args.folds))]
    print(json.dumps(results["loo_only_loss"]), flush=True)
    if args.synthetic:
        results["synthetic"] = synthetic_check(args.seed, args.epochs)
        print(json.dumps(results["synthetic"]), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k not in ("folds", "synthetic")}))


if __name__ == "__main__":
    main()
