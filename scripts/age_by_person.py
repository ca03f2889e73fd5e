"""Age on London split by person: the age task's candidate inputs against face-api's own age
and the mean-age baseline.

For each seed the people are dealt into k folds (facedist.reports.person.person_folds); per fold
every candidate is trained on the other folds' people through the age task's code (the preset's
ridge, without the refit, which changes the shipped weights and not what is measured) and scored
on this fold's people. A seed's MAE pools its folds' photos; each row is the mean ± std over
seeds. Rows without an age label (London has none for two people) are left out.

    scripts/age_by_person.py --data out/london --out docs/results/london_age

writes results.json and table.md there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CANDIDATES = (("fage",), ("emb",), ("emb", "fage"), ("expf", "fage"), ("id", "tex", "fage"),
              ("emb", "expf", "fage"), ("emb", "id", "tex", "fage"), ("feature", "fage"), ("id", "tex"))


def main(argv=None) -> int:
    from facedist.reports.person import person_folds
    from facedist.schema import inputs_label
    from facedist.training.data import TRAINING_COLUMNS, load_data
    from facedist.training.engine import fit
    from facedist.training.presets import preset_config
    from facedist.training.tasks import regressor_from_split, task_inputs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a coefficients table with an age label (London)")
    parser.add_argument("--out", default="docs/results/london_age")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--candidates", default=";".join(",".join(c) for c in CANDIDATES),
                        help="input groups per candidate, ';' between candidates (e.g. 'fage;emb,fage')")
    parser.add_argument("--l2", type=float, default=None, help="the ridge (default: the preset's)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    data = load_data(args.data, columns=TRAINING_COLUMNS)
    if data.age is None:
        raise SystemExit(f"{args.data} has no age label column (extract from a manifest with an age column)")
    data = data.subset(np.flatnonzero(np.isfinite(data.age)))
    shipped = task_inputs(preset_config("age"))
    candidates = [tuple(c.split(",")) for c in args.candidates.split(";") if c]
    candidates = [c for c in candidates if all(data.group(g) is not None for g in c)]
    if shipped not in candidates and all(data.group(g) is not None for g in shipped):
        candidates.append(shipped)
    y = np.asarray(data.age, np.float64)
    fage = data.group("fage")
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for seed in range(args.seeds):
        folds = person_folds(data.subject, args.folds, seed)
        errors = {c: np.zeros(len(y)) for c in candidates}
        baseline = np.zeros(len(y))
        for fold in range(args.folds):
            train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
            baseline[test] = np.abs(y[train].mean() - y[test])
            for c in candidates:
                config = preset_config("age", inputs=c, folds=args.folds, fold=fold, seed=seed, refit=False,
                                       l2=args.l2)
                task = regressor_from_split(config, data, train, test)
                result = fit(task, config)
                errors[c][test] = np.abs(_predict(task, result.best_state) - y[test])
        add("mean age of the training people", float(baseline.mean()))
        if fage is not None:
            add("face-api's own age", float(np.abs(fage[:, 0] - y).mean()))
        for c in candidates:
            add(inputs_label(c), float(errors[c].mean()))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)

    summary = {name: {"mean": round(float(np.mean(v)), 3), "std": round(float(np.std(v)), 3),
                      "per_seed": [round(x, 3) for x in v]} for name, v in rows.items()}
    results = {"data": args.data, "rows": int(len(y)), "people": int(len({str(s) for s in data.subject})),
               "folds": args.folds, "seeds": args.seeds, "l2": preset_config("age", l2=args.l2).l2,
               "shipped": inputs_label(shipped), "mae_years": summary,
               "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _predict(task, state: dict) -> np.ndarray:
    """The validation rows' predictions in years of a trained RegressorTask's weights."""
    import torch

    from facedist.recognition import predict_years

    model = task.build_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        out = model(task.x_val).numpy()
    return predict_years({"extra": task.extra}, out)


def markdown(results: dict) -> str:
    lines = [f"Age on London split by person: mean absolute error in years, {results['folds']} folds by person x "
             f"{results['seeds']} seeds (mean ± std over seeds), {results['rows']} photos of {results['people']} people "
             f"with an age label; ridge l2 {results['l2']}. **bold**: the shipped preset ({results['shipped']}).", "",
             "| predictor | MAE (years) |", "|---|---|"]
    for name, s in results["mae_years"].items():
        cell = f"{s['mean']:.2f} ± {s['std']:.2f}"
        lines.append(f"| {name} | {'**' + cell + '**' if name == results['shipped'] else cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
