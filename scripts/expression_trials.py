"""Expression descriptors beyond the report's, on the report's own protocol (folds split by person,
several seeds, the same logistic probe): what else was tried to lift London's neutral / happy
figure, and which photos every one of them misses. Evidence for the README, not part of the product.

    .venv/bin/python scripts/expression_trials.py --data TABLE --out docs/results/london

TABLE is the default extraction (tddfa-fit, dlib landmarks) of a set with expression labels.
Writes expression_trials.json and expression_trials.md into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from facedist import storage
from facedist.extractors.tddfa import TDDFARegressor, crop_resize
from facedist.features import QUALITY_SCALARS
from facedist.images import decode_image
from facedist.reports.person import logistic_probe, person_folds, unit_total_variance, usually_missed
from facedist.texture import TextureSampler, normalised_colour
from facedist.training.data import encode_labels, load_data

# dlib's 68: brows, nose and eyes barely move in a smile; the similarity is fitted to them
STABLE_POINTS = list(range(17, 48))
MOUTH_POINTS = list(range(48, 68))


def probe_hits(x: np.ndarray, codes: np.ndarray, subjects: np.ndarray, seeds: int, n_classes: int,
               mirror: np.ndarray | None = None) -> np.ndarray:
    """(seeds, rows) 1 hit / 0 miss (nan: not scored) of the report's probe on 5 person folds. With `mirror`, the
    mirrored crops' descriptors join training and each test row is the mean of the two."""
    out = np.full((seeds, len(x)), np.nan)
    for seed in range(seeds):
        folds = person_folds(subjects, 5, seed)
        for fold in range(5):
            tr, te = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
            if mirror is None:
                w = unit_total_variance(x, tr)
                pred = logistic_probe(w[tr], codes[tr], w[te], n_classes)
            else:
                both = np.vstack([x, mirror])
                w = unit_total_variance(both, np.concatenate([tr, tr + len(x)]))
                test = (w[:len(x)] + w[len(x):]) / 2
                pred = logistic_probe(np.vstack([w[tr], w[tr + len(x)]]), np.concatenate([codes[tr]] * 2),
                                      test[te], n_classes)
            out[seed, te] = pred == codes[te]
    return out


def finetune_hits(crops: np.ndarray, net: torch.nn.Module, codes: np.ndarray, subjects: np.ndarray,
                  seeds: int, n_classes: int, epochs: int) -> np.ndarray:
    """The regressor's last block (dw6) and a linear head trained end to end on each fold's
    training people (flips, small shifts and scalings, brightness and contrast); the mirrored
    crop's logits added at test. Everything below dw6, BN statistics included, stays the checkpoint's."""
    from facedist.models.mobilenet import _BLOCKS

    below = [b[0] for b in _BLOCKS][:-1]

    def stem(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = net.relu(net.bn1(net.conv1(x)))
            for name in below:
                h = getattr(net, name)(h)
        return h

    x = (torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() - 127.5) / 128.0
    y = torch.as_tensor(codes)
    out = np.full((seeds, len(crops)), np.nan)
    for seed in range(seeds):
        folds = person_folds(subjects, 5, seed)
        for fold in range(5):
            tr, te = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
            g = torch.Generator().manual_seed(1000 * seed + fold)
            torch.manual_seed(1000 * seed + fold)
            block = copy.deepcopy(net.dw6).eval()
            head = torch.nn.Linear(block.conv_sep.out_channels, n_classes)
            opt = torch.optim.AdamW([{"params": block.parameters(), "lr": 1e-4},
                                     {"params": head.parameters(), "lr": 1e-3}], weight_decay=1e-2)
            for _ in range(epochs):
                order = tr[torch.randperm(len(tr), generator=g).numpy()]
                for i in range(0, len(order), 16):
                    b = order[i:i + 16]
                    logits = head(block(stem(_augment(x[b], g))).mean((2, 3)))
                    loss = torch.nn.functional.cross_entropy(logits, y[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                logits = head(block(stem(x[te])).mean((2, 3))) + head(block(stem(x[te].flip(3))).mean((2, 3)))
            out[seed, te] = logits.argmax(1).numpy() == codes[te]
    return out


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips, scalings within 5%, shifts within 2% of the crop, brightness and contrast."""
    n = len(x)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    s = 1 + (torch.rand(n, generator=g) - 0.5) * 0.1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = s
    theta[:, :, 2] = (torch.rand(n, 2, generator=g) - 0.5) * 0.08
    grid = torch.nn.functional.affine_grid(theta, x.shape, align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.3
    return x * contrast + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.3


def similarity_coefficients(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares similarity z -> a z + b taking each (P, 2) point set of src (N, P, 2) onto
    dst (P, 2), as complex numbers: a (N,), b (N,)."""
    z = src[..., 0] + 1j * src[..., 1]
    w = dst[:, 0] + 1j * dst[:, 1]
    zc = z - z.mean(1, keepdims=True)
    a = (np.conj(zc) * (w - w.mean())).sum(1) / (np.abs(zc) ** 2).sum(1)
    return a, w.mean() - a * z.mean(1)


def aligned_landmarks(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N, 68, 2) landmarks, each mapped by the similarity that best takes its stable points onto
    the reference's (68, 2): a fixed shape, so no row's alignment depends on the others."""
    a, b = similarity_coefficients(points[:, STABLE_POINTS], reference[STABLE_POINTS])
    z = a[:, None] * (points[..., 0] + 1j * points[..., 1]) + b[:, None]
    return np.stack([z.real, z.imag], -1)


def zoomed_crops(images: list[np.ndarray], centres: np.ndarray, half: np.ndarray, size: int = 120) -> np.ndarray:
    """Square BGR crops of side 2*half around each centre, resampled bilinearly to size."""
    out = []
    for img, c, r in zip(images, centres, half):
        k = size / (2 * r)
        A = np.float32([[k, 0, (r - c[0]) * k], [0, k, (r - c[1]) * k]])
        out.append(cv2.warpAffine(img, A, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    return np.stack(out)[..., ::-1]


def hog(grey: np.ndarray, cell: int = 8, bins: int = 9) -> np.ndarray:
    """Dalal-Triggs HOG: unsigned gradient orientation in `bins`, `cell` px cells, 2x2-cell blocks
    normalised L2-Hys. (The opencv-python-headless wheel has no HOGDescriptor.)"""
    g = grey.astype(np.float64)
    gx, gy = cv2.Sobel(g, cv2.CV_64F, 1, 0, ksize=1), cv2.Sobel(g, cv2.CV_64F, 0, 1, ksize=1)
    magnitude, angle = np.hypot(gx, gy), np.rad2deg(np.arctan2(gy, gx)) % 180
    ny, nx = g.shape[0] // cell, g.shape[1] // cell
    index = np.minimum((angle / (180 / bins)).astype(int), bins - 1)[:ny * cell, :nx * cell]
    weights = magnitude[:ny * cell, :nx * cell]
    cells = np.zeros((ny, nx, bins))
    rows, cols = np.indices(index.shape)
    np.add.at(cells, (rows // cell, cols // cell, index), weights)
    blocks = []
    for i in range(ny - 1):
        for j in range(nx - 1):
            v = cells[i:i + 2, j:j + 2].ravel()
            v = np.minimum(v / np.sqrt((v ** 2).sum() + 1e-6), 0.2)
            blocks.append(v / np.sqrt((v ** 2).sum() + 1e-6))
    return np.concatenate(blocks)


def hog_aligned(images: list[np.ndarray], points: np.ndarray, size: int = 96) -> np.ndarray:
    """HOG of a grey crop aligned on the eyes and the mouth."""
    dst = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.78]]) * size
    src = np.stack([points[:, 36:42].mean(1), points[:, 42:48].mean(1), points[:, MOUTH_POINTS].mean(1)], 1)
    a, b = similarity_coefficients(src, dst)   # all three points count: no outlier rejection
    out = []
    for img, ai, bi in zip(images, a, b):
        M = np.float32([[ai.real, -ai.imag, bi.real], [ai.imag, ai.real, bi.imag]])
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        out.append(hog(cv2.warpAffine(grey, M, (size, size), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_REPLICATE)))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="coefficients table (default extraction)")
    ap.add_argument("--out", required=True, help="folder for expression_trials.json and .md")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=30)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)

    data = load_data(args.data)
    codes, classes = encode_labels(data.expression)
    # the report's rows (a subject, finite landmarks) that have an expression label
    keep = [s is not None and c >= 0 for s, c in zip(data.subject, codes)]
    data = data.subset(np.flatnonzero(np.asarray(keep) & np.isfinite(data.landmarks).all(axis=(1, 2))))
    codes, classes = encode_labels(data.expression)
    subjects = data.subject.astype(str)
    print(f"{len(data)} rows, {len(set(subjects))} people, classes {list(classes)}", flush=True)
    images = [decode_image(storage.read_bytes(str(p))) for p in data.path]

    regressor = TDDFARegressor()
    fits = regressor.fit(images, data.box)
    crops = np.stack([crop_resize(img, f.roi_box)[:, :, ::-1] for img, f in zip(images, fits)])  # BGR, as the regressor
    feature = data.quality[:, len(QUALITY_SCALARS):]
    rerun = np.stack([f.feature for f in fits])
    # the table's f must be what these crops give, or the mirrored trial compares unlike things
    drift = float(np.abs(rerun - feature).max() / (np.abs(feature).max() + 1e-9))
    if drift > 1e-3:
        print(f"warning: f from these crops differs from the table's by {drift:.1%} of its range; "
              "the mirrored trial is not comparable to the report's f", flush=True)
    mirrored_f = regressor.regress(np.ascontiguousarray(crops[:, :, ::-1]))[1]

    points = data.landmarks.astype(np.float64)
    reference = regressor.model.lm_mean.reshape(-1, 3)[:, :2] * [1.0, -1.0]   # model y is up, image y down
    iod = np.linalg.norm(points[:, 36:42].mean(1) - points[:, 42:48].mean(1), axis=1)
    lower_centre = (points[:, MOUTH_POINTS].mean(1) + points[:, 33]) / 2
    lower = zoomed_crops(images, lower_centre, 1.2 * iod)
    lower_f = regressor.regress(lower)[1]
    lower_mirrored = regressor.regress(np.ascontiguousarray(lower[:, :, ::-1]))[1]

    sampler = TextureSampler(regressor.model)
    eye_height = regressor.model.lm_mean.reshape(-1, 3)[36:48, 1].mean()
    below_eyes = regressor.model.mean.reshape(-1, 3)[sampler.indices, 1] < eye_height
    with warnings.catch_warnings():  # a row with no visible vertex: all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        # hidden vertices are NaN; they get 1, the mean of a normalised colour, learned from no row
        grey = np.nan_to_num(np.nanmean(normalised_colour(data.texture), 2), nan=1.0)

    n = len(classes)
    trials = {
        "f (the report's)": lambda: probe_hits(feature, codes, subjects, args.seeds, n),
        "β (the report's)": lambda: probe_hits(data.exp_coeffs, codes, subjects, args.seeds, n),
        "f, trained and tested with the mirrored crop": lambda: probe_hits(rerun, codes, subjects, args.seeds, n,
                                                                          mirror=mirrored_f),
        "dlib 68 landmarks, aligned on brows, eyes, nose": lambda: probe_hits(
            aligned_landmarks(points, reference).reshape(len(data), -1), codes, subjects, args.seeds, n),
        "grey texture below the eyes (vertex colour)": lambda: probe_hits(grey[:, below_eyes], codes, subjects,
                                                                          args.seeds, n),
        "f of a lower-face crop 2.4 eye-distances wide, mirrored too": lambda: probe_hits(
            lower_f, codes, subjects, args.seeds, n, mirror=lower_mirrored),
        "HOG of a 96 px eye-and-mouth-aligned crop": lambda: probe_hits(hog_aligned(images, points), codes,
                                                                        subjects, args.seeds, n),
        f"regressor's last block fine-tuned, {args.finetune_epochs} epochs": lambda: finetune_hits(
            crops, copy.deepcopy(regressor.net).eval(), codes, subjects, args.seeds, n, args.finetune_epochs),
    }
    hits, trial_rows = {}, []
    for name, trial in trials.items():
        t0 = time.perf_counter()
        hits[name] = trial()
        acc = np.nanmean(hits[name], 1)
        trial_rows.append({"descriptor": name, "mean": float(acc.mean()), "std": float(acc.std()),
                     "seeds": [float(a) for a in acc], "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name:60s} {acc.mean():.3f} ± {acc.std():.3f}  ({trial_rows[-1]['seconds']} s)", flush=True)

    usually = {name: usually_missed(h) for name, h in hits.items()}
    every = np.logical_and.reduce(list(usually.values()))
    results = {"data": args.data, "rows": len(data), "people": len(set(subjects)), "classes": list(classes),
               "folds": 5, "seeds": args.seeds, "table_feature_drift": drift, "trials": trial_rows,
               "missed_by_every_trial": [{"path": str(data.path[i]), "label": str(data.expression[i])}
                                         for i in np.flatnonzero(every)],
               "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expression_trials.json").write_text(json.dumps(results, indent=2))
    lines = [f"Expression, {len(data)} rows, {len(set(subjects))} people: 5 folds split by person x {args.seeds} "
             "seeds, the report's probe (mean ± std over seeds). Made by scripts/expression_trials.py.", "",
             "| descriptor | accuracy |", "|---|---|"]
    lines += [f"| {r['descriptor']} | {r['mean']:.3f} ± {r['std']:.3f} |" for r in trial_rows]
    labels = [str(data.expression[i]) for i in np.flatnonzero(every)]
    lines += ["", f"Rows every trial usually misses (more than half its seeds): {len(labels)} "
              f"({', '.join(f'{labels.count(c)} {c}' for c in classes if labels.count(c))})."]
    (out / "expression_trials.md").write_text("\n".join(lines) + "\n")
    print(f"missed by every trial: {len(labels)}; {results['seconds']} s")


if __name__ == "__main__":
    main()
