"""Which embedding to ship: candidate embeddings on people never seen in training.

The person report's protocol (facedist.reports.person): per seed, the people are dealt into k
folds; per fold, everything learned (the map, the threshold) is fitted on the other folds'
people, and scored on this fold's people. Per candidate:

  rank-1        each held-out probe photo (every photo but the person's gallery one) against one
                gallery photo (London: neutral, Yale: normal) of *every* person, as the report
  verification  held-out pairs (two photos of one held-out person: genuine; of two: impostor):
                TAR at 1% FAR (threshold from those held-out impostors: the ROC's best case),
                and the TAR and FAR at the threshold chosen on the training people's pairs
                (what a shipped bundle would do on new people)
  open set      half of the held-out people are enrolled (their gallery photo), the other half
                never are; a probe of an enrolled person is identified when its top-1 is right and
                scores at or above the threshold, a probe of a never-enrolled one raises a false
                alarm when its top-1 scores at or above it. The identification rate (DIR) at a
                1% false-alarm rate (threshold from the never-enrolled probes, pooled over the
                folds of a seed), and DIR and false alarms at the training threshold and at
                identify's own cut-off (EmbeddingModel.open_set_threshold for the gallery's size).

Mean ± std over seeds; the DET curve pools the held-out pairs of every seed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facedist.gallery.embedding import TARGET_FAR, fit_embedding, pair_scores, threshold_at_far

# name -> (inputs, learned within-person whitening)
CANDIDATES = {
    "descriptor": (("emb",), False),
    "descriptor, whitened": (("emb",), True),
    "descriptor + α + τ, whitened": (("emb", "id", "tex"), True),
    "α + τ, whitened": (("id", "tex"), True),
}


@dataclass
class EvaluateConfig:
    data: str
    out: str
    gallery: str = "neutral"      # expression label of each person's gallery photo
    folds: int = 5
    seeds: int = 5
    far: float = TARGET_FAR


def _tar_at_far(genuine, impostor, far) -> float:
    return float(np.mean(np.asarray(genuine) >= threshold_at_far(impostor, far)))


def evaluate_seed(data, seed: int, config: EvaluateConfig, candidates: dict) -> dict:
    from facedist.reports.person import _gallery_rows, person_folds

    subjects = np.asarray([str(s) for s in data.subject])
    expr = np.asarray([str(v) for v in data.expression])
    folds = person_folds(subjects, config.folds, seed)
    gallery_rows = _gallery_rows(subjects, expr, config.gallery)
    rng = np.random.default_rng(1000 + seed)
    acc = {name: {"hits": [], "genuine": [], "impostor": [], "accepted_genuine": 0, "accepted_impostor": 0,
                  "enrolled": [], "never": [], "threshold": []} for name in candidates}
    for fold in range(config.folds):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        probes = np.setdiff1d(test, gallery_rows)
        test_people = np.array(sorted(set(subjects[test])))
        never = set(rng.choice(test_people, len(test_people) // 2, replace=False).tolist())
        open_gallery = np.array([g for g in gallery_rows if subjects[g] not in never])
        enrolled_probes = np.array([p for p in probes if subjects[p] not in never], np.int64)
        never_probes = np.array([r for r in test if subjects[r] in never], np.int64)
        for name, (inputs, whiten) in candidates.items():
            model = fit_embedding(data, inputs, whiten, config.far, rows=train)
            e = model.embed(data.descriptor(inputs))
            a = acc[name]
            a["threshold"].append(model.threshold)
            nearest = gallery_rows[(e[probes] @ e[gallery_rows].T).argmax(1)]
            a["hits"].append(subjects[nearest] == subjects[probes])
            genuine, impostor = pair_scores(e[test], subjects[test])
            a["genuine"].append(genuine)
            a["impostor"].append(impostor)
            a["accepted_genuine"] += int(np.sum(genuine >= model.threshold))
            a["accepted_impostor"] += int(np.sum(impostor >= model.threshold))
            for kind, rows in (("enrolled", enrolled_probes), ("never", never_probes)):
                if len(rows):
                    s = e[rows] @ e[open_gallery].T
                    top = s.argmax(1)
                    correct = subjects[open_gallery[top]] == subjects[rows]
                    a[kind].append(np.stack([s[np.arange(len(rows)), top], correct,
                                             np.full(len(rows), model.threshold),
                                             np.full(len(rows), model.open_set_threshold(len(open_gallery)))], 1))
    out = {}
    for name, a in acc.items():
        genuine, impostor = np.concatenate(a["genuine"]), np.concatenate(a["impostor"])
        enrolled, never = np.concatenate(a["enrolled"]), np.concatenate(a["never"])
        alarm_t = threshold_at_far(never[:, 0], config.far)
        out[name] = {
            "rank1": float(np.concatenate(a["hits"]).mean()),
            "tar_at_far": _tar_at_far(genuine, impostor, config.far),
            "threshold_tar": a["accepted_genuine"] / len(genuine),
            "threshold_far": a["accepted_impostor"] / len(impostor),
            "threshold_mean": float(np.mean(a["threshold"])),
            "dir_at_far": float(np.mean((enrolled[:, 1] == 1) & (enrolled[:, 0] >= alarm_t))),
            "dir_at_threshold": float(np.mean((enrolled[:, 1] == 1) & (enrolled[:, 0] >= enrolled[:, 2]))),
            "false_alarm_at_threshold": float(np.mean(never[:, 0] >= never[:, 2])),
            "dir_at_open_threshold": float(np.mean((enrolled[:, 1] == 1) & (enrolled[:, 0] >= enrolled[:, 3]))),
            "false_alarm_at_open_threshold": float(np.mean(never[:, 0] >= never[:, 3])),
            "open_threshold_mean": float(np.mean(never[:, 3])),
            "pairs": {"genuine": int(len(genuine)), "impostor": int(len(impostor))},
            "open_set_probes": {"enrolled": int(len(enrolled)), "never_enrolled": int(len(never))},
            "_genuine": genuine, "_impostor": impostor,
        }
    return out


def evaluate(config: EvaluateConfig, candidates: dict | None = None, log=print) -> dict:
    from facedist.training.data import load_data

    started = time.perf_counter()
    candidates = candidates or CANDIDATES
    data = load_data(config.data)
    data = data.subset(np.flatnonzero([s is not None for s in data.subject]))
    available = set(data.available_inputs())
    candidates = {n: c for n, c in candidates.items() if set(c[0]) <= available}
    per_seed = []
    for seed in range(config.seeds):
        per_seed.append(evaluate_seed(data, seed, config, candidates))
        log(f"seed {seed}: " + "; ".join(f"{n} rank-1 {r['rank1']:.3f} TAR@FAR {r['tar_at_far']:.3f}"
                                         for n, r in per_seed[-1].items()))
    summary = {}
    for name in candidates:
        keys = [k for k in per_seed[0][name] if not k.startswith("_") and isinstance(per_seed[0][name][k], float)]
        summary[name] = {k: {"mean": float(np.mean([s[name][k] for s in per_seed])),
                             "std": float(np.std([s[name][k] for s in per_seed]))} for k in keys}
        summary[name]["pairs_per_seed"] = per_seed[0][name]["pairs"]
        summary[name]["open_set_probes_per_seed"] = per_seed[0][name]["open_set_probes"]
    curves = {name: (np.concatenate([s[name]["_genuine"] for s in per_seed]),
                     np.concatenate([s[name]["_impostor"] for s in per_seed])) for name in candidates}
    results = {"data": config.data, "gallery": config.gallery, "folds": config.folds, "seeds": config.seeds,
               "far": config.far, "people": int(len(set(map(str, data.subject)))), "photos": int(len(data)),
               "summary": summary, "seconds": round(time.perf_counter() - started, 1)}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(markdown(results))
    plot_det(curves, out / "det.png", f"{Path(config.data).name}: held-out pairs, {config.seeds} seeds")
    return results


ROWS = (("rank1", "rank-1"), ("tar_at_far", "TAR @ FAR 1%"), ("threshold_tar", "TAR at the training threshold"),
        ("threshold_far", "FAR at the training threshold"), ("dir_at_far", "open-set DIR @ 1% false alarms"),
        ("dir_at_threshold", "DIR at the training threshold"),
        ("false_alarm_at_threshold", "false alarms at the training threshold"),
        ("dir_at_open_threshold", "DIR at identify's open-set threshold"),
        ("false_alarm_at_open_threshold", "false alarms at identify's open-set threshold (target 0.01)"),
        ("open_threshold_mean", "identify's open-set threshold (cosine)"),
        ("threshold_mean", "training threshold (cosine)"))


def markdown(results: dict) -> str:
    names = list(results["summary"])
    lines = [f"{results['people']} people, {results['photos']} photos; {results['folds']} folds by person x "
             f"{results['seeds']} seeds (mean ± std over seeds); gallery photo: '{results['gallery']}'", "",
             "| held-out people | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in ROWS:
        cells = []
        for n in names:
            s = results["summary"][n].get(key)
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = results["summary"][names[0]]
    lines += ["", f"Per seed: {first['pairs_per_seed']['genuine']} genuine and {first['pairs_per_seed']['impostor']} "
                  f"impostor held-out pairs; open set {first['open_set_probes_per_seed']['enrolled']} probes of "
                  f"enrolled and {first['open_set_probes_per_seed']['never_enrolled']} of never-enrolled people.", ""]
    return "\n".join(lines)


def plot_det(curves: dict, path: Path, title: str) -> None:
    """DET: false non-match rate against false match rate, both on log scales."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for name, (genuine, impostor) in curves.items():
        thresholds = np.unique(np.concatenate([genuine, impostor]))
        g, i = np.sort(genuine), np.sort(impostor)
        fmr = 1 - np.searchsorted(i, thresholds, side="left") / len(i)
        fnmr = np.searchsorted(g, thresholds, side="left") / len(g)
        floor_m, floor_n = 0.5 / len(i), 0.5 / len(g)
        ax.plot(np.maximum(fmr, floor_m), np.maximum(fnmr, floor_n), label=name, lw=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(TARGET_FAR, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("false match rate (impostor pairs accepted)")
    ax.set_ylabel("false non-match rate (genuine pairs rejected)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
