"""`facedist report --protocol person`: the people tested on are never seen in training.

For each seed the people are dealt into k folds. Per fold, everything learned (standardisation,
PCA, the texture basis, the identity metric, the classifiers) is fitted on the other folds'
people only, then scored on this fold's people; a seed's figure pools its folds, and each row is
the mean ± std over seeds.

- identity, gallery -> probe rank-1: every person has one gallery image (the one whose expression
  label is ``gallery``: London's neutral photo, Yale's normal one); every other image of the test
  fold's people is a probe, matched by cosine similarity against the gallery of *all* people after
  a within-person whitening learned on the training people (an LDA/WCCN-style metric).
- gender and expression, per image: L2-regularised multinomial logistic regression on the
  standardised inputs, all dimensions kept (no PCA whitening first: that would lift the
  low-variance, noisy directions to the strength of the rest).

Descriptors: α (identity coefficients), τ (texture coefficients on a basis fitted on the training
folds' samples), α+τ, β (expression coefficients), β+τ, f (the regressor's pooled feature, where
the backend stores one), β+f; the pixel baseline is the same probe on the grey landmark-centred
crop. Optionally a ResNet-34 trained from scratch on those crops (the paper's image CNN), on the
same folds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from facedist.features import within_class_whitening
from facedist.training.data import CoefficientData, encode_labels

PROBE_DIMS = 80          # identity metric: inputs wider than this are PCA-reduced (on the training rows) first
PROBE_L2 = 1e-3          # logistic regression's weight decay, on inputs of unit total variance
METRIC_FLOOR = 1e-2      # within-person whitening: smallest eigenvalue kept, relative to the mean
PIXEL_SIZE = 64          # the pixel baseline's crop side


@dataclass
class PersonReportConfig:
    data: str                              # coefficients table (local or s3://)
    out: str = "results"
    folds: int = 5
    seeds: int = 5
    gallery: str = "neutral"               # expression label of each person's gallery image
    include_images: bool = True            # the ResNet-34 image baseline (slow on CPU)
    image_size: int = 64
    image_epochs: int = 15
    image_seeds: int | None = None         # the ResNet baseline over fewer seeds (None: all)
    # The trained models (training.presets, through facedist train's code) beside the probes:
    # every head on each candidate input of MODEL_INPUTS. The head each task ships runs on every
    # seed; the others on the first model_seeds seeds (None: all).
    heads: tuple[str, ...] = ("linear", "mlp", "resnet")
    model_seeds: int | None = None
    # At most this many rows, whole people drawn with seed 0 (training.data.sample_people; None or
    # 0: every row), so that a 100,000-row table is reported on a sample, and says so.
    max_rows: int | None = 1000


# ------------------------------------------------------------------------------ probes

def person_folds(subjects: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per row; all of a person's rows share one fold."""
    people = np.array(sorted({str(s) for s in subjects}))
    np.random.default_rng(seed).shuffle(people)
    fold_of = {p: i % k for i, p in enumerate(people)}
    return np.array([fold_of[str(s)] for s in subjects])


def _reduce(train: np.ndarray, rows: np.ndarray, dims: int = PROBE_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """Standardise on the training rows; PCA (whitened) to `dims` when wider."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, rows = (train - mean) / std, (rows - mean) / std
    if train.shape[1] <= min(dims, len(train) - 1):
        return train, rows
    _, s, vt = np.linalg.svd(train, full_matrices=False)
    # Wider than there are training rows: the trailing components have no spread, and whitening
    # them would blow the test rows up; keep those with at least 1e-3 of the leading one's.
    d = min(dims, int(np.sum(s > 1e-3 * s[0])), len(train) - 1)
    scale = np.sqrt(len(train)) / np.maximum(s[:d], 1e-9)
    return train @ vt[:d].T * scale, rows @ vt[:d].T * scale


def logistic_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                   l2: float = PROBE_L2) -> np.ndarray:
    """Predicted classes of x_test: L2-regularised multinomial logistic regression (L-BFGS), every
    dimension kept. The inputs are taken as scaled: pass `unit_total_variance` descriptors (or a
    pair of them side by side), so that PROBE_L2 means about the same whatever their width."""
    a, b = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    X, y = torch.as_tensor(a), torch.as_tensor(y_train)
    W = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + bias, y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (torch.as_tensor(b) @ W + bias).argmax(1).numpy()


def identity_matches(x: np.ndarray, subjects: np.ndarray, train: np.ndarray, gallery: np.ndarray,
                     probes: np.ndarray) -> np.ndarray:
    """For each probe row, whether its nearest gallery row (cosine, after the within-person
    whitening of the training rows) is the same person."""
    a, rows = _reduce(x[train], x)
    z = rows @ within_class_whitening(a, subjects[train], METRIC_FLOOR)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    nearest = gallery[(z[probes] @ z[gallery].T).argmax(1)]
    return subjects[nearest] == subjects[probes]


# ------------------------------------------------------------------------------ descriptors

def fold_descriptors(data: CoefficientData, train: np.ndarray, pixels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every descriptor for all rows, scaled by `unit_total_variance` on `train`, with whatever it
    learns (the texture basis) from `train` alone. A pair ("exp+tex") is its two descriptors side
    by side, each scaled alone, so in the probes neither drowns the other by its number of
    dimensions (the identity metric re-standardises and whitens, which undoes that balance)."""
    from facedist.features import QUALITY_SCALARS

    out = {"id": unit_total_variance(data.id_coeffs, train), "exp": unit_total_variance(data.exp_coeffs, train)}
    if data.texture is not None:
        from facedist.texture import TextureBasis

        basis = TextureBasis.fit(data.texture[train], data.layout.texture.split("+")[0])
        out["tex_raw"] = basis.project(data.texture).astype(np.float32)  # the trained models' τ input
        out["tex"] = unit_total_variance(out["tex_raw"], train)
    if data.n_feature:
        out["feature"] = unit_total_variance(data.quality[:, len(QUALITY_SCALARS):], train)
    for name in ("emb", "expf"):  # the pretrained networks' descriptors, where the table has them
        if data.group(name) is not None:
            out[name] = unit_total_variance(data.group(name), train)
    for a, b in (("id", "tex"), ("exp", "tex"), ("exp", "feature")):
        if b in out and a in out:
            out[f"{a}+{b}"] = np.hstack([out[a], out[b]])
    if pixels is not None:
        out["pixels"] = unit_total_variance(pixels, train)
    return out


def unit_total_variance(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Standardised on the training rows, then divided by the square root of its width: unit total
    variance, so one regularisation strength suits 10 dimensions and 4,096 alike."""
    x = np.asarray(x, np.float64)
    return (x - x[train].mean(0)) / (x[train].std(0) + 1e-6) / np.sqrt(x.shape[1])


TASK_DESCRIPTORS = {"identity": ("id", "tex", "id+tex", "feature", "emb", "pixels"),
                    "gender": ("id", "tex", "id+tex", "feature", "emb", "pixels"),
                    "expression": ("exp", "tex", "exp+tex", "feature", "exp+feature", "expf", "pixels")}


# The trained models' candidate inputs per task (schema.INPUT_GROUPS), each with every head;
# a candidate the table cannot give is left out.
MODEL_INPUTS = {"identity": (("id",), ("tex",), ("id", "tex"), ("emb",), ("emb", "id", "tex")),
                "gender": (("id",), ("tex",), ("id", "tex"), ("emb",), ("emb", "tex")),
                "expression": (("exp",), ("exp", "tex"), ("exp", "feature"), ("expf",), ("exp", "expf"),
                               ("exp", "tex", "expf"), ("exp", "tex", "expf", "feature"))}
# The 1-D ResNets are the slow heads: they run on the coefficients alone (the paper's question) and
# on the task's shipped inputs; the light heads run on every candidate.
RESNET_ONLY_ON = "paper and shipped inputs"


def model_row_label(name: str) -> str:
    """"linear:id+tex" -> "linear head on α + τ" (tables and plots)."""
    from facedist.schema import inputs_label

    head, _, inputs = name.partition(":")
    return f"{head} head on {inputs_label(tuple(inputs.split('+')))}"


def model_row_name(head: str, inputs: tuple[str, ...]) -> str:
    """The summary key of a trained model's row, e.g. "linear:id+tex"."""
    return f"{head}:{'+'.join(inputs)}"


def pixel_descriptor(crops: np.ndarray) -> np.ndarray:
    """Flattened grey crops, each standardised (its own exposure and contrast removed)."""
    x = crops.reshape(len(crops), -1).astype(np.float64)
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)


# ------------------------------------------------------------------------------ the protocol

@dataclass
class SeedResult:
    accuracy: dict[str, dict[str, float]]     # {task: {descriptor: accuracy}}, pooled over the folds
    correct: dict[str, dict[str, np.ndarray]]  # {task: {descriptor: per row 1 hit, 0 miss, nan not scored}}


def run_seed(data: CoefficientData, seed: int, config: PersonReportConfig, pixels, crops, log=print) -> SeedResult:
    """One seed: every descriptor's accuracy per task, and which rows each got right."""
    folds = person_folds(data.subject, config.folds, seed)
    expr = np.array([str(v) for v in data.expression])
    gallery_rows = _gallery_rows(data.subject, expr, config.gallery)
    tasks = {}
    for column in ("gender", "expression"):
        codes, names = encode_labels(getattr(data, column))
        if len(names) >= 2:
            tasks[column] = (codes, names)
    correct: dict[str, dict[str, np.ndarray]] = {t: {} for t in ("identity", *tasks)}

    def record(task: str, name: str, rows: np.ndarray, hits: np.ndarray) -> None:
        correct[task].setdefault(name, np.full(len(data), np.nan))[rows] = hits

    image_hits: dict[str, list] = {}   # the ResNet's hits come from a confusion matrix: counts, no rows
    for fold in range(config.folds):
        train = np.flatnonzero(folds != fold)
        test = np.flatnonzero(folds == fold)
        desc = fold_descriptors(data, train, pixels)
        probes = np.setdiff1d(test, gallery_rows)
        if config.heads:
            fold_data = replace(data, tex_coeffs=desc.get("tex_raw"))  # τ from this fold's basis, as the probes
            for task, by_row in trained_model_hits(fold_data, train, test, gallery_rows, tasks, config,
                                                   seed).items():
                for name, (rows, hits) in by_row.items():
                    record(task, name, rows, hits)
        for name in TASK_DESCRIPTORS["identity"]:
            if name in desc and len(gallery_rows) and len(probes):
                record("identity", name, probes,
                       identity_matches(desc[name], data.subject.astype(str), train, gallery_rows, probes))
        for task, (codes, names) in tasks.items():
            tr, te = train[codes[train] >= 0], test[codes[test] >= 0]
            if len(set(codes[tr])) < 2 or not len(te):
                continue
            for name in TASK_DESCRIPTORS[task]:
                if name in desc:
                    pred = logistic_probe(desc[name][tr], codes[tr], desc[name][te], len(names))
                    record(task, name, te, pred == codes[te])
        if crops is not None and (config.image_seeds is None or seed < config.image_seeds):
            for task, hits in _image_baseline(data, crops, train, test, gallery_rows, tasks, config, seed).items():
                image_hits.setdefault(task, []).extend(hits)
    accuracy = {task: {name: float(np.nanmean(v)) for name, v in by.items()} for task, by in correct.items()}
    for task, hits in image_hits.items():
        accuracy[task]["resnet34_images"] = float(np.mean(hits))
    log(f"seed {seed}: " + "; ".join(f"{t} " + ", ".join(f"{n} {a:.3f}" for n, a in by.items())
                                     for t, by in accuracy.items()))
    return SeedResult(accuracy, correct)


def trained_model_hits(data: CoefficientData, train: np.ndarray, test: np.ndarray, gallery_rows: np.ndarray,
                       tasks: dict, config: PersonReportConfig, seed: int) -> dict:
    """{task: {row name: (rows scored, hits)}} for every head on every candidate input: each
    trained from its task preset on the training people alone, as `facedist train` trains it (its
    own validation split for early stopping), then scored on the test people. Identity: trained on
    everyone's gallery photo plus the training people's photos, single images (the probes are
    single photos); with nothing of the test people to validate on, the last epoch is kept."""
    from facedist.training.bundle import build_model
    from facedist.training.engine import fit
    from facedist.training.presets import preset_config
    from facedist.recognition import bundle_logits
    from facedist.schema import DEFAULT_INPUTS
    from facedist.training.tasks import classifier_from_split, make_classifier_task, task_inputs

    def loaded(task_obj, state) -> dict:
        bundle = task_obj.bundle(state, {})
        model = build_model(bundle["model_config"])
        model.load_state_dict(bundle["state_dict"])
        return {**bundle, "model": model.eval()}

    available = set(data.available_inputs())
    out: dict = {}
    probes = np.setdiff1d(test, gallery_rows)
    subjects = data.subject.astype(str)
    for task in ("identity", *tasks):
        for inputs in MODEL_INPUTS[task]:
            if not set(inputs) <= available:
                continue
            x = data.descriptor(inputs)
            for head in config.heads:
                if head == "resnet" and inputs not in (DEFAULT_INPUTS[task], task_inputs(preset_config(task))):
                    continue  # RESNET_ONLY_ON
                if head != preset_config(task).head and config.model_seeds is not None and seed >= config.model_seeds:
                    continue
                cfg = preset_config(task, inputs=inputs, head=head, seed=seed)
                if task == "identity":
                    if not len(gallery_rows) or not len(probes):
                        continue
                    id_train = np.union1d(train, gallery_rows)
                    cfg = replace(cfg, patience=cfg.epochs, aggregate="mean")
                    task_obj = classifier_from_split(cfg, data, id_train, id_train[:1], combo_size=1)
                    bundle = loaded(task_obj, fit(task_obj, cfg).last_state)
                    predicted = np.asarray(bundle["labels"])[bundle_logits(bundle, x[probes]).argmax(1)]
                    out.setdefault(task, {})[model_row_name(head, inputs)] = (probes, predicted == subjects[probes])
                    continue
                codes, names = tasks[task]
                tr, te = train[codes[train] >= 0], test[codes[test] >= 0]
                if len(set(codes[tr])) < 2 or not len(te):
                    continue
                task_obj = make_classifier_task(cfg, data.subset(tr))
                bundle = loaded(task_obj, fit(task_obj, cfg).best_state)
                predicted = np.asarray(bundle["labels"])[bundle_logits(bundle, x[te]).argmax(1)]
                truth = np.asarray([str(v) for v in getattr(data, task)[te]])
                out.setdefault(task, {})[model_row_name(head, inputs)] = (te, predicted == truth)
    return out


def _gallery_rows(subjects: np.ndarray, expr: np.ndarray, gallery: str) -> np.ndarray:
    """One gallery row per person: the first with the gallery expression label."""
    rows, seen = [], set()
    for i in np.flatnonzero(expr == gallery):
        if subjects[i] not in seen:
            seen.add(subjects[i])
            rows.append(i)
    return np.asarray(rows, np.int64)


def _image_baseline(data, crops, train, test, gallery_rows, tasks, config: PersonReportConfig, seed: int) -> dict:
    """ResNet-34 from scratch on the crops, same folds. Identity: trained on the gallery images of
    everyone plus the training people's other images, scored on the test people's probes."""
    from facedist.training.engine import TrainConfig, fit
    from facedist.training.image_baseline import ImageTask

    out = {}
    subject_codes, people = encode_labels(data.subject)
    id_train = np.union1d(train, gallery_rows)
    id_test = np.setdiff1d(test, gallery_rows)
    jobs = {"identity": (subject_codes, people, id_train, id_test)}
    for task, (codes, names) in tasks.items():
        jobs[task] = (codes, names, train[codes[train] >= 0], test[codes[test] >= 0])
    cfg = TrainConfig(task="image_identity", epochs=config.image_epochs, batch_size=16, patience=config.image_epochs,
                      seed=seed, image_size=config.image_size)
    for task, (codes, names, tr, te) in jobs.items():
        if not len(tr) or not len(te):
            continue
        task_cfg = replace(cfg, task="image_identity" if task == "identity" else "image_expression")
        image_task = ImageTask(task_cfg, crops[tr], codes[tr], crops[te], codes[te], names,
                               data.layout.to_json(), None, {"label_column": task})
        result = fit(image_task, task_cfg)
        # the last epoch's model: the test people must not pick the epoch
        confusion = np.asarray(result.history[-1]["confusion"])
        out[task] = np.arange(int(confusion.sum())) < int(np.trace(confusion))  # hits, in no order
    return out


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "seeds": [float(v) for v in arr]}


DESCRIPTOR_NAMES = {"id": "α (identity coefficients)", "exp": "β (expression coefficients)",
                    "tex": "τ (texture coefficients)", "id+tex": "α + τ", "exp+tex": "β + τ",
                    "feature": "f (the regressor's pooled feature)", "exp+feature": "β + f",
                    "emb": "e (dlib's face descriptor)", "expf": "x (face-api's expression feature)",
                    "pixels": "pixels: grey 64 px crop, same probe",
                    "resnet34_images": "ResNet-34 on crops, from scratch"}


def write_person_report(config: PersonReportConfig, log=print) -> dict:
    from facedist.training.data import load_data, sample_people
    from facedist.training.image_baseline import load_crops

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(config.data)
    keep = np.flatnonzero([s is not None for s in data.subject])
    data = data.subset(keep[np.isfinite(data.landmarks[keep]).all(axis=(1, 2))])
    data, note = sample_people(data, config.max_rows)
    if note:
        log(f"note: {note}")
    log(f"person protocol on {len(data)} rows, {len(set(data.subject))} people, {config.folds} folds x "
        f"{config.seeds} seeds")
    grey_crops = load_crops(data, PIXEL_SIZE)
    pixels = pixel_descriptor(grey_crops)
    crops = None
    if config.include_images:
        crops = grey_crops if config.image_size == PIXEL_SIZE else load_crops(data, config.image_size)
    seed_results = [run_seed(data, seed, config, pixels, crops, log) for seed in range(config.seeds)]
    per_seed = [r.accuracy for r in seed_results]
    summary = {task: {name: _summary([s[task][name] for s in per_seed if name in s.get(task, {})])
                      for name in per_seed[0][task]} for task in per_seed[0]}
    missed = most_missed(data, summary, seed_results)
    results = {"data": config.data, "protocol": "person", "rows_used": len(data),
               "people": len(set(data.subject)), "backend": data.layout.backend, "folds": config.folds,
               "seeds": config.seeds, "gallery": config.gallery, "summary": summary, "per_seed": per_seed,
               "image_size": config.image_size, "image_epochs": config.image_epochs,
               "most_missed": missed, "shipped": shipped_rows(), "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table_person.md").write_text(_markdown(results))
    _plot(summary, out / "person_protocol.png")
    _plot_most_missed(missed, data, grey_crops, out / "most_missed.png")
    return results


def most_missed(data: CoefficientData, summary: dict, seed_results: list[SeedResult]) -> dict:
    """Per task, the rows that the best probe descriptor (highest mean) got wrong on at least one
    seed, most often missed first: where a figure falls short, these are the photos to look at.
    Each row also names the other probe descriptors that usually miss it (on more than half of the
    seeds that scored it), and `missed_by_every_probe` counts the rows that all of them usually
    miss: a photo no descriptor reads is more likely ambiguous than a descriptor's blind spot.
    The ResNet keeps no per-row hits, so it is not among them."""
    out = {}
    for task, rows in summary.items():
        scored_names = [n for n in rows if any(n in r.correct.get(task, {}) for r in seed_results)]
        if not scored_names:
            continue
        # a seed whose folds could not score a descriptor (too few classes) adds nothing
        hits = {n: np.stack([r.correct[task].get(n, np.full(len(data.path), np.nan)) for r in seed_results])
                for n in scored_names}
        usually = {n: usually_missed(h) for n, h in hits.items()}
        best = max(scored_names, key=lambda n: rows[n]["mean"])
        missed, scored = miss_counts(hits[best])
        labels = data.subject if task == "identity" else getattr(data, task)
        order = sorted(np.flatnonzero(missed), key=lambda i: (-missed[i], str(data.path[i])))
        out[task] = {"descriptor": best, "probes": scored_names,
                     "missed_by_every_probe": int(np.logical_and.reduce(list(usually.values())).sum()),
                     "rows": [{"path": str(data.path[i]), "subject": str(data.subject[i]), "label": str(labels[i]),
                               "missed": int(missed[i]), "scored": int(scored[i]),
                               "also_missed_by": [n for n in scored_names if n != best and usually[n][i]]}
                              for i in order]}
    return out


def miss_counts(hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, rows) 1 hit, 0 miss, nan not scored -> per row, the seeds that missed it and that scored it."""
    return (hits == 0).sum(0), (~np.isnan(hits)).sum(0)


def usually_missed(hits: np.ndarray) -> np.ndarray:
    """(seeds, rows) hits, nan where not scored -> rows missed on more than half the seeds that scored them."""
    missed, scored = miss_counts(hits)
    return (scored > 0) & (2 * missed > scored)


def shipped_rows() -> dict[str, str]:
    """Each task's shipped preset as a trained-model row name ("linear:emb+id+tex")."""
    from facedist.training.presets import preset_config
    from facedist.training.tasks import task_inputs

    return {task: model_row_name(preset_config(task).head, task_inputs(preset_config(task)))
            for task in MODEL_INPUTS}


def label_of(name: str) -> str:
    """A summary row's name in tables: a probe descriptor's, or a trained model's."""
    return DESCRIPTOR_NAMES.get(name) or (model_row_label(name) if ":" in name else name)


def _markdown(results: dict) -> str:
    lines = [f"{results['folds']} folds split by person x {results['seeds']} seeds (mean ± std over seeds), "
             f"{results['rows_used']} rows, {results['people']} people, backend {results['backend']}; "
             f"identity = rank-1 of each probe against one '{results['gallery']}' gallery image per person", ""]
    from facedist.schema import inputs_label

    def cell(s: dict) -> str:
        return f"{s['mean']:.3f} " + (f"± {s['std']:.3f}" if len(s["seeds"]) > 1 else "(1 seed)")

    shipped = results.get("shipped", {})
    for task, rows in results["summary"].items():
        models = {n: r for n, r in rows.items() if ":" in n}
        if models:
            heads = [h for h in ("linear", "mlp", "resnet") if any(n.startswith(h + ":") for n in models)]
            lines += [f"| {task}: trained model, inputs | " + " | ".join(f"{h} head" for h in heads) + " |",
                      "|---" * (len(heads) + 1) + "|"]
            for inputs in dict.fromkeys(n.partition(":")[2] for n in models):
                marks = []
                for h in heads:
                    name = f"{h}:{inputs}"
                    text = cell(models[name]) if name in models else "–"
                    marks.append(f"**{text}** (shipped)" if shipped.get(task) == name else text)
                lines.append(f"| {inputs_label(tuple(inputs.split('+')))} | " + " | ".join(marks) + " |")
            lines.append("")
        lines += [f"| {task}: probe on a descriptor | accuracy |", "|---|---|"]
        for name, s in rows.items():
            if ":" not in name:
                lines.append(f"| {label_of(name)} | {cell(s)} |")
        lines.append("")
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(r) for r in summary.values())
    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 1.2 + 0.22 * rows), squeeze=False)
    for ax, (task, rows) in zip(axes[0], summary.items()):
        names = list(rows)
        means = [rows[n]["mean"] for n in names]
        ax.barh(range(len(names)), means, xerr=[rows[n]["std"] for n in names], color="#4a7ab7")
        ax.set_yticks(range(len(names)), [n if ":" not in n else model_row_label(n) for n in names], fontsize=8)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_title(task, fontsize=10)
        for i, m in enumerate(means):
            ax.text(min(m + 0.02, 0.85), i, f"{m:.3f}", va="center", fontsize=7)
    fig.suptitle("split by person: accuracy, mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_most_missed(missed: dict, data: CoefficientData, crops: np.ndarray, path: Path, per_task: int = 10) -> None:
    """The crops each task's best descriptor misses most often, captioned with the true label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, h in missed.items() if h["rows"]]
    if not tasks:
        return
    row_of = {str(p): i for i, p in enumerate(data.path)}
    fig, axes = plt.subplots(len(tasks), per_task, figsize=(1.3 * per_task, 2.1 * len(tasks)), squeeze=False)
    for axes_row, task in zip(axes, tasks):
        entries = missed[task]["rows"][:per_task]
        name = label_of(missed[task]["descriptor"])
        axes_row[0].set_title(f"{task}, {name}", fontsize=8, loc="left")
        for ax, entry in zip(axes_row, entries):
            ax.imshow(crops[row_of[entry["path"]]], cmap="gray", vmin=0, vmax=255)
            others = len(missed[task]["probes"]) - 1
            ax.set_xlabel(f"{entry['label'][:12]}\nmissed {entry['missed']}/{entry['scored']}"
                          f"\n+{len(entry['also_missed_by'])}/{others} others", fontsize=7)
        for ax in axes_row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes_row[len(entries):]:
            ax.axis("off")
    fig.suptitle("most often missed by each task's best descriptor (true label; seeds missed / seeds scored; "
                 "how many of the other probe descriptors usually miss it too)", fontsize=8)
    fig.tight_layout(h_pad=1.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
