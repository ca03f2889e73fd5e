"""The training tasks: what each trains on, its model, and its metrics (see engine.fit).

- cnet: C-Net on sets of one person's *training* images (leave-one-out landmark loss).
- identity: a classifier on a person's descriptor aggregated over C(n, 3) combinations of their
  images (by C-Net or the plain mean); the split is by image, so validation combinations use
  validation images only. People with fewer photos than the combination size get smaller sets
  (combo_size_for).
- gender: a classifier on each image's descriptor; split by subject (a person's gender must not
  leak through their identity).
- expression: a classifier on each image's descriptor; split by image.
- age: a regressor (years) on each image's descriptor; split by person (RegressorTask).

A classifier's input is a descriptor: the groups of ``config.inputs`` side by side (id, exp,
tex, feature, ...; schema.INPUT_GROUPS). Its head is the paper's 1-D ResNet (34 for identity and
gender, 32 for expression), a linear layer or a small MLP (``config.head``). Inputs are whitened
within class on the training split (``input_norm``, see features.Standardizer), and the whitening,
the groups and the head travel in the bundle with the weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from facedist.features import Standardizer
from facedist.models.cnet import CNetConfig, aggregate_identity, confidence_weights
from facedist.models.registry import create_model
from facedist.training.bundle import make_bundle
from facedist.training.data import CoefficientData, combos_per_subject, encode_labels, group_combinations, image_folds
from facedist.training.engine import TrainConfig

COEFFICIENT_TASKS = ("identity", "expression", "gender", "age")
REGRESSION_TASKS = ("age",)  # a number per image (RegressorTask), not a class
LABEL_COLUMN = {"identity": "subject", "expression": "expression", "gender": "gender", "age": "age",
                "image_identity": "subject", "image_expression": "expression"}
# within_class: standardise, then whiten by the within-class covariance; within_class_cosine: and
# scale to unit length; standard: standardise only.
# per_group: standardise, then scale each input group to unit total variance, so a group of 256
# dimensions weighs in as much as one of 10 (what the split-by-person probes do).
INPUT_NORMS = ("within_class", "within_class_cosine", "standard", "per_group")
AGGREGATES = ("cnet", "mean")  # how identity combinations are pooled: C-Net confidences or the plain mean
HEADS = ("resnet", "linear", "mlp")
# The paper's 1-D ResNet per task; the light heads are one architecture for every task.
RESNET_ARCH = {"identity": "resnet34_1d", "gender": "resnet34_1d", "expression": "resnet32_1d", "age": "resnet34_1d"}
LIGHT_HEADS = {"linear": "linear_head", "mlp": "mlp_head"}


def head_model(task: str, head: str) -> str:
    """The registry name of a task's head."""
    if head not in HEADS:
        raise ValueError(f"head {head!r}: choose one of {', '.join(HEADS)}")
    return RESNET_ARCH[task] if head == "resnet" else LIGHT_HEADS[head]


def task_inputs(config: TrainConfig) -> tuple[str, ...]:
    from facedist.schema import DEFAULT_INPUTS, parse_inputs

    return parse_inputs(config.inputs) if config.inputs else DEFAULT_INPUTS[config.task]


def combo_size_for(subjects: np.ndarray, config: TrainConfig) -> tuple[int, str | None]:
    """The identity combination size this data supports, and a one-line note when it is smaller
    than config.combo_size: with k folds by image a person keeps about (k-1)/k of their photos for
    training, and a combination padded by repeating a photo teaches nothing about aggregation."""
    counts = np.array(list(_counts(subjects).values()))
    if not len(counts):
        return config.combo_size, None
    per_person = float(np.median(counts)) * (config.folds - 1) / config.folds
    size = int(max(1, min(config.combo_size, np.floor(per_person))))
    if size >= config.combo_size:
        return config.combo_size, None
    what = "single images" if size == 1 else f"sets of {size}"
    return size, (f"people have {int(np.median(counts))} photos (median), fewer than a {config.combo_size}-photo "
                  f"combination leaves for training: identity trains and validates on {what}")


def _counts(values: np.ndarray) -> dict:
    keys, counts = np.unique(np.asarray([str(v) for v in values if v is not None]), return_counts=True)
    return dict(zip(keys.tolist(), counts.tolist()))


# ------------------------------------------------------------------------------ metrics

def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(matrix, (true, pred), 1)
    return matrix


# Above this many classes a validation reports per-class counts (true positives, support,
# predictions) instead of a classes x classes confusion matrix: 10,000 people would make it
# 800 MB per worker, all-reduced every epoch and kept in the history.
CONFUSION_MAX_CLASSES = 1000


def metrics_from_counts(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> dict:
    """metrics_from_confusion's accuracy and macro-F1 from per-class counts (no matrix)."""
    tp, support, predicted = (np.asarray(a, np.float64) for a in (tp, support, predicted))
    total = support.sum()
    present = (support + predicted) > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1e-12), 0.0)
    return {"accuracy": float(tp.sum() / total) if total else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0, "n_val": int(total)}


def metrics_from_confusion(matrix: np.ndarray) -> dict:
    """accuracy and macro-F1 (over classes present in truth or predictions)."""
    matrix = np.asarray(matrix, np.float64)
    total = matrix.sum()
    tp = np.diag(matrix)
    support, predicted = matrix.sum(1), matrix.sum(0)
    present = (support + predicted) > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1e-12), 0.0)
    return {"accuracy": float(tp.sum() / total) if total else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "n_val": int(total), "confusion": matrix.astype(np.int64).tolist()}


def _shard(n: int, rank: int, world: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """This rank's slice of a (shuffled when a generator is given) index; equal sizes per rank so
    DDP's collective calls stay in step (the remainder is dropped when training)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if generator is not None:
        per_rank = n // world
        return order[rank * per_rank:(rank + 1) * per_rank]
    return order[rank::world]


# ------------------------------------------------------------------------------ classifiers

class ClassifierTask:
    """A classifier over fixed input vectors (descriptors or their aggregates)."""

    monitor = ("accuracy", "max")

    def __init__(self, config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                 y_val: np.ndarray, labels: list[str], layout_json: str, arch: str, extra: dict | None = None):
        self.config = config
        self.labels = labels
        if config.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {config.input_norm!r}: choose one of {INPUT_NORMS}")
        self.extra = extra or {}
        # per_group: the widths of the input groups side by side (one group when not recorded).
        self.group_dims = list(self.extra.get("input_dims") or [x_train.shape[1]])
        self._fit_norm(x_train, y_train, x_val, y_val)
        self.layout_json = layout_json
        # facedist.models.registry: the architecture by name, its keyword arguments.
        self.model_name = arch
        self.model_config = {"input_dim": x_train.shape[1], "num_classes": len(labels), "dropout": config.dropout}

    def _fit_norm(self, x_train, y_train, x_val, y_val) -> None:
        """The input normalisation, fitted on the training rows, and the normalised tensors."""
        norm = self.config.input_norm
        self.raw = (x_train, y_train, x_val, y_val)
        self.norm = Standardizer.fit(x_train, y_train if norm.startswith("within_class") else None,
                                     unit_length=norm == "within_class_cosine",
                                     group_dims=self.group_dims if norm == "per_group" else None)
        self.x_train = torch.as_tensor(self.norm(x_train))
        self.y_train = torch.as_tensor(y_train)
        self.x_val = torch.as_tensor(self.norm(x_val))
        self.y_val = torch.as_tensor(y_val)

    def use_all_rows(self) -> None:
        """Train on the training and validation rows together from here on (TrainConfig.refit);
        the normalisation is fitted again on all of them, and the bundle says so."""
        self._fit_norm(*self._all_rows())
        self.extra = {**self.extra, "refit": True,
                      "n_train_images": int(self.extra.get("n_train_images", 0) + self.extra.get("n_val_images", 0))}

    def _all_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, y of the training and validation rows together, x_val, y_val), unnormalised."""
        x_train, y_train, x_val, y_val = self.raw
        return np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), x_val, y_val

    def build_model(self):
        model = create_model(self.model_name, **self.model_config)
        if self.config.prototype_init:
            self._init_prototypes(model)
        return model

    PROTOTYPE_SCALE = 10.0  # logits of a prototype head: this times the cosine (a softmax temperature)

    def _init_prototypes(self, model) -> None:
        """fc = the unit-length mean of each class's normalised training inputs (scaled so a
        logit is PROTOTYPE_SCALE x cosine for inputs of norm sqrt(D)); bias 0."""
        if self.model_name != LIGHT_HEADS["linear"]:
            raise ValueError("prototype_init needs the linear head")
        x, y = self.x_train.double(), self.y_train
        means = torch.zeros(len(self.labels), x.shape[1], dtype=torch.float64).index_add_(0, y, x)
        means = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            model.fc.weight.copy_(means * self.PROTOTYPE_SCALE / x.shape[1] ** 0.5)
            model.fc.bias.zero_()

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficient augmentation: Gaussian noise in the normalised input's units (after
        within-class whitening, one unit is one within-class std: noise of about that size
        stands in for the views and expressions a person was not seen in) and a small random
        per-sample gain (a regressor's estimates wobble in both ways)."""
        if self.config.noise <= 0:
            return x
        gain = 1 + 0.1 * self.config.noise * torch.randn(x.shape[0], 1)
        return x * gain + self.config.noise * torch.randn_like(x)

    def ridge(self, model) -> torch.Tensor:
        """config.l2 x the input width x the sum of squared weights of every linear layer: on
        standardised inputs that keeps one l2 meaning the same shrinkage for 10 dimensions and 200."""
        # per_group: each group has unit total variance, so the groups count, not their dimensions.
        width = len(self.group_dims) if self.config.input_norm == "per_group" else self.model_config["input_dim"]
        return self.config.l2 * width * sum((p ** 2).sum() for n, p in model.named_parameters()
                                            if n.endswith("weight") and p.dim() == 2)

    def train_epoch(self, model, optimizer, epoch: int, rank: int, world: int, device) -> dict:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        index = _shard(len(self.y_train), rank, world, generator)
        # Every rank runs the same number of full batches (DDP all-reduces per step).
        return self._train_batches(model, optimizer, index, max(len(index) // self.config.batch_size, 1), device)

    def _train_batches(self, model, optimizer, index: torch.Tensor, steps: int, device) -> dict:
        """``steps`` batches of config.batch_size rows of x_train, in ``index`` order."""
        loss_sum, count = 0.0, 0
        bs = self.config.batch_size
        for step in range(steps):
            batch = index[step * bs:(step + 1) * bs]
            x = self.augment(self.x_train[batch]).to(device)
            y = self.y_train[batch].to(device)
            loss = self.loss(model(x), y)
            if self.config.l2:
                loss = loss + self.ridge(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(batch)
            count += len(batch)
        return {"loss": loss_sum, "count": count}

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, y, label_smoothing=0.05)

    def predict_logits(self, model, index: torch.Tensor, device) -> torch.Tensor:
        return model(self.x_val[index].to(device)).float().cpu()

    def evaluate(self, model, rank: int, world: int, device) -> dict:
        return self._evaluate_rows(model, _shard(len(self.y_val), rank, world), device)

    def _evaluate_rows(self, model, index: torch.Tensor, device) -> dict:
        n = len(self.labels)
        if n > CONFUSION_MAX_CLASSES:
            return self._evaluate_counts(model, index, device)
        if len(index) == 0:
            return {"confusion": torch.zeros(n, n, dtype=torch.float64), "val_loss": 0.0}
        logits = torch.cat([self.predict_logits(model, index[i:i + 256], device)
                            for i in range(0, len(index), 256)])
        y = self.y_val[index]
        matrix = confusion_matrix(y.numpy(), logits.argmax(1).numpy(), n)
        return {"confusion": torch.as_tensor(matrix, dtype=torch.float64),
                "val_loss": float(F.cross_entropy(logits, y, reduction="sum"))}

    def _evaluate_counts(self, model, index: torch.Tensor, device) -> dict:
        """evaluate for many classes: batch by batch, per-class counts instead of a matrix."""
        n = len(self.labels)
        counts = {k: torch.zeros(n, dtype=torch.float64) for k in ("tp", "support", "predicted")}
        loss = 0.0
        for i in range(0, len(index), 256):
            batch = index[i:i + 256]
            logits, y = self.predict_logits(model, batch, device), self.y_val[batch]
            pred = logits.argmax(1)
            ones = torch.ones(len(batch), dtype=torch.float64)
            counts["tp"].index_add_(0, y[pred == y], ones[pred == y])
            counts["support"].index_add_(0, y, ones)
            counts["predicted"].index_add_(0, pred, ones)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
        return {**counts, "val_loss": loss}

    def summarize(self, sums: dict) -> dict:
        if "confusion" not in sums:
            out = metrics_from_counts(sums["tp"].numpy(), sums["support"].numpy(), sums["predicted"].numpy())
            out["val_loss"] = sums["val_loss"] / max(out["n_val"], 1)
            return out
        out = metrics_from_confusion(sums["confusion"].numpy())
        out["val_loss"] = sums["val_loss"] / max(out["n_val"], 1)
        return out

    def bundle(self, state: dict, metrics: dict) -> dict:
        return make_bundle(task=self.config.task, model_config={"name": self.model_name, **self.model_config},
                           state_dict=state, labels=self.labels, layout_json=self.layout_json,
                           input_norm=self.norm.to_dict(), metrics=_jsonable(metrics), extra=self.extra)


class RegressorTask(ClassifierTask):
    """A linear (or MLP / 1-D ResNet) regressor of one number per image (age, in years) over
    fixed input vectors: the classifier's inputs, normalisation, ridge and recipe, with one output
    and the target standardised on the training rows (years = mean + std x output; the bundle's
    extra holds target_mean and target_std). The loss is the squared error in those units (with
    the ridge: ridge regression; a linear head starts at its exact solution); validation reports the mean absolute error in years (mae, the
    monitored metric), its RMSE, and the MAE of predicting the training rows' mean (mae_baseline)."""

    monitor = ("mae", "min")

    def __init__(self, config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                 y_val: np.ndarray, layout_json: str, arch: str, extra: dict | None = None):
        if config.input_norm.startswith("within_class") or config.prototype_init:
            raise ValueError(f"{config.task}: a regressor has no classes to whiten within or start from; "
                             "use input_norm standard or per_group")
        super().__init__(config, x_train, np.asarray(y_train, np.float64), x_val, np.asarray(y_val, np.float64),
                         [], layout_json, arch, extra)
        self.model_config["num_classes"] = 1

    def _fit_norm(self, x_train, y_train, x_val, y_val) -> None:
        super()._fit_norm(x_train, y_train, x_val, y_val)
        self.target_mean = float(np.mean(y_train))
        self.target_std = float(max(np.std(y_train), 1e-6))
        self.y_train = torch.as_tensor((y_train - self.target_mean) / self.target_std, dtype=torch.float32)
        self.y_val = torch.as_tensor(y_val, dtype=torch.float32)   # years
        self.extra = {**self.extra, "target_mean": self.target_mean, "target_std": self.target_std}

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs[:, 0], y)

    def build_model(self):
        model = create_model(self.model_name, **self.model_config)
        if self.model_name == LIGHT_HEADS["linear"]:
            self._init_ridge(model)
        return model

    def _init_ridge(self, model) -> None:
        """The linear head starts at the exact minimum of what it is trained on (the mean squared
        error + the ridge penalty, see ridge()) on the normalised training rows, so the epochs
        refine a solution instead of travelling to one: a few hundred Adam steps of lr 1e-2 from a
        random start did not always reach a weight near 1 (one input, face-api's age, on London)."""
        x, y = self.x_train.double(), self.y_train.double()
        x_mean, y_mean = x.mean(0), y.mean()
        xc, yc = x - x_mean, y - y_mean
        width = len(self.group_dims) if self.config.input_norm == "per_group" else self.model_config["input_dim"]
        gram = xc.T @ xc / len(xc) + self.config.l2 * width * torch.eye(xc.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, xc.T @ yc / len(xc))
        with torch.no_grad():
            model.fc.weight.copy_(w[None].float())
            model.fc.bias.fill_(float(y_mean - x_mean @ w))

    def evaluate(self, model, rank: int, world: int, device) -> dict:
        index = _shard(len(self.y_val), rank, world)
        if len(index) == 0:
            return {"abs": 0.0, "sq": 0.0, "baseline_abs": 0.0, "count": 0.0}
        out = torch.cat([self.predict_logits(model, index[i:i + 256], device) for i in range(0, len(index), 256)])
        years = self.target_mean + self.target_std * out[:, 0].double()
        y = self.y_val[index].double()
        return {"abs": float((years - y).abs().sum()), "sq": float(((years - y) ** 2).sum()),
                "baseline_abs": float((self.target_mean - y).abs().sum()), "count": float(len(index))}

    def summarize(self, sums: dict) -> dict:
        n = max(sums["count"], 1)
        return {"mae": sums["abs"] / n, "rmse": (sums["sq"] / n) ** 0.5, "mae_baseline": sums["baseline_abs"] / n,
                "val_loss": sums["sq"] / n / self.target_std ** 2, "n_val": int(sums["count"])}


def _jsonable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list, bool))}


def identity_inputs(x: np.ndarray, subjects: np.ndarray, index: np.ndarray, config: TrainConfig,
                    confidences: np.ndarray | None, seed: int, combo_size: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregated descriptor ``x`` per C(n, r) combination of the images in ``index``, per
    subject. Returns (inputs (M, D), subject of each, combos (M, r))."""
    r = combo_size or config.combo_size
    combos, owners = group_combinations(subjects, index, r,
                                        combos_per_subject(config.max_combos_per_subject, config.max_combos_per_epoch,
                                                           subjects[index]), seed)
    conf = None if confidences is None else torch.as_tensor(confidence_weights(confidences, x.shape[1])[combos])
    return aggregate_identity(torch.as_tensor(x[combos]), conf).numpy(), owners, combos


def cnet_confidences(data: CoefficientData, cnet_bundle: dict) -> np.ndarray:
    """Per-image confidences (N, n_id) from a loaded C-Net bundle."""
    norm = Standardizer.from_dict(cnet_bundle["input_norm"])
    with torch.no_grad():
        return cnet_bundle["model"](torch.as_tensor(norm(data.quality))).numpy()


def classifier_from_split(config: TrainConfig, data: CoefficientData, train_idx: np.ndarray, val_idx: np.ndarray,
                          confidences: np.ndarray | None = None, labels: list[str] | None = None,
                          combo_size: int | None = None, extra: dict | None = None) -> ClassifierTask:
    """The classifier of config.task trained on rows ``train_idx`` and validated on ``val_idx`` of
    ``data`` (labelled rows only), with the task's inputs, head and identity aggregation. The
    split-by-person report uses this directly; make_classifier_task picks the split."""
    inputs = task_inputs(config)
    column = LABEL_COLUMN[config.task]
    x = data.descriptor(inputs)
    codes, labels = encode_labels(data.labels(column), labels if labels is not None else config.labels)
    extra = {"label_column": column, "fold": config.fold, "folds": config.folds, "seed": config.seed,
             "inputs": list(inputs), "input_dims": [int(data.group(g).shape[1]) for g in inputs],
             "head": config.head, **(extra or {})}
    if config.redraw_combos:
        raise ValueError("redraw_combos draws identity combinations per epoch on Ray Train's shards "
                         "(run_training with ingest shards); this path draws them once")
    if config.task == "identity":
        x_train, y_train, _ = identity_inputs(x, data.subject, train_idx, config, confidences, config.seed, combo_size)
        x_val, y_val, _ = identity_inputs(x, data.subject, val_idx, config, confidences, config.seed + 1, combo_size)
        y_train, _ = encode_labels(y_train, labels)
        y_val, _ = encode_labels(y_val, labels)
        extra.update(aggregate=config.aggregate, combo_size=combo_size or config.combo_size, cnet=config.cnet)
    else:
        x_train, y_train, x_val, y_val = x[train_idx], codes[train_idx], x[val_idx], codes[val_idx]
    extra.update(n_train_images=int(len(train_idx)), n_val_images=int(len(val_idx)))
    return ClassifierTask(config, x_train, y_train, x_val, y_val, labels, data.layout.to_json(),
                          head_model(config.task, config.head), extra)


def person_split(subjects: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per row, all of a person's rows in one fold: the people, shuffled by ``seed``,
    dealt round the k folds (the person report's person_folds)."""
    people = np.array(sorted({str(s) for s in subjects}))
    np.random.default_rng(seed).shuffle(people)
    fold_of = {p: i % k for i, p in enumerate(people)}
    return np.array([fold_of[str(s)] for s in subjects])


def regressor_from_split(config: TrainConfig, data: CoefficientData, train_idx: np.ndarray,
                         val_idx: np.ndarray) -> RegressorTask:
    """The regressor of config.task (age) trained on rows ``train_idx`` and validated on
    ``val_idx`` of ``data`` (rows with a label only), with the task's inputs and head."""
    inputs = task_inputs(config)
    column = LABEL_COLUMN[config.task]
    x, y = data.descriptor(inputs), np.asarray(data.labels(column), np.float64)
    extra = {"label_column": column, "fold": config.fold, "folds": config.folds, "seed": config.seed,
             "inputs": list(inputs), "input_dims": [int(data.group(g).shape[1]) for g in inputs],
             "head": config.head, "split": "person", "n_train_images": int(len(train_idx)),
             "n_val_images": int(len(val_idx))}
    return RegressorTask(config, x[train_idx], y[train_idx], x[val_idx], y[val_idx], data.layout.to_json(),
                         head_model(config.task, config.head), extra)


def make_regressor_task(config: TrainConfig, data: CoefficientData) -> RegressorTask:
    """Age: the rows with a label, split by person (a person's age must not leak through their
    identity); this run validates on fold config.fold."""
    column = LABEL_COLUMN[config.task]
    values = data.labels(column)
    if values is None or not np.isfinite(np.asarray(values, np.float64)).any():
        raise ValueError(f"no rows with an {column!r} label for task {config.task!r} (a manifest's {column} column)")
    data = data.subset(np.flatnonzero(np.isfinite(np.asarray(values, np.float64))))
    folds = person_split(data.subject, config.folds, config.seed)
    return regressor_from_split(config, data, np.flatnonzero(folds != config.fold),
                                np.flatnonzero(folds == config.fold))


def task_folds(config: TrainConfig, subject: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The fold of every (labelled) row for a classifier task: identity and expression by image,
    stratified by person or label; gender by person (a person's gender must not leak through
    their identity), stratified by gender. ``values``: the task's label per row."""
    if config.task in ("identity", "expression"):
        return image_folds(values, config.folds, config.seed)
    if config.task == "gender":
        # Split by subject: the fold of a subject is the fold of all of its images, stratified by
        # the gender of the subject's first row.
        keys, inverse = np.unique(np.asarray(subject).astype(str), return_inverse=True)
        first = np.full(len(keys), len(inverse), np.int64)
        np.minimum.at(first, inverse, np.arange(len(inverse)))
        subject_gender = np.asarray(values, dtype=object)[first]
        return image_folds(subject_gender, config.folds, config.seed)[inverse]
    raise ValueError(f"unknown coefficient task {config.task!r}")


def make_classifier_task(config: TrainConfig, data: CoefficientData,
                         confidences: np.ndarray | None = None) -> ClassifierTask:
    """confidences: per-image C-Net confidences for identity (else loaded from config.cnet)."""
    if config.task in REGRESSION_TASKS:
        return make_regressor_task(config, data)
    column = LABEL_COLUMN[config.task]
    values = data.labels(column)
    has_label = np.array([v is not None and (config.labels is None or v in config.labels) for v in values])
    if not has_label.any():
        raise ValueError(f"no rows with a {column!r} label for task {config.task!r}")
    data = data.subset(np.flatnonzero(has_label))
    if confidences is not None:
        confidences = confidences[np.flatnonzero(has_label)]
    _, labels = encode_labels(data.labels(column), config.labels)
    if config.task == "identity":
        folds = task_folds(config, data.subject, data.subject)
        train_idx, val_idx = np.flatnonzero(folds != config.fold), np.flatnonzero(folds == config.fold)
        if config.aggregate == "mean":
            confidences = None
        elif confidences is None:
            if not config.cnet:
                raise ValueError("identity with aggregate='cnet' needs a C-Net bundle (--cnet); "
                                 "or pass --aggregate mean")
            from facedist.training.bundle import load_model_bundle
            confidences = cnet_confidences(data, load_model_bundle(config.cnet))
        combo_size, note = combo_size_for(data.subject, config)
        return classifier_from_split(config, data, train_idx, val_idx, confidences, labels, combo_size,
                                     {"note": note} if note else None)
    folds = task_folds(config, data.subject, data.labels(column))
    train_idx, val_idx = np.flatnonzero(folds != config.fold), np.flatnonzero(folds == config.fold)
    return classifier_from_split(config, data, train_idx, val_idx, labels=labels)


# ------------------------------------------------------------------------------ C-Net

class CNetTask:
    """Weakly supervised C-Net; validation = leave-one-out landmark error on held-out images."""

    monitor = ("loo_error_cnet", "min")

    def __init__(self, config: TrainConfig, data: CoefficientData, basis=None, true_id_coeffs: np.ndarray | None = None,
                 split: str = "image", model_overrides: dict | None = None, loss_config=None):
        from facedist.training.cnet import CNetLossConfig, prepare_sets
        from facedist.training.geometry import KeypointBasis

        self.config = config
        self.basis = basis or KeypointBasis.tddfa()
        if self.basis.n_id != data.id_coeffs.shape[1]:
            raise ValueError(f"the keypoint basis has {self.basis.n_id} identity dims, the table "
                             f"{data.id_coeffs.shape[1]}: C-Net needs the backend's basis")
        if split == "image":   # the same folds as the identity task: C-Net never sees validation images
            folds = image_folds(data.subject, config.folds, config.seed)
        else:                  # split by person (new people at validation)
            subjects = np.array(sorted(set(data.subject.astype(str))))
            fold_of = dict(zip(subjects, np.arange(len(subjects)) % config.folds))
            folds = np.array([fold_of[s] for s in data.subject.astype(str)])
        train_idx, val_idx = np.flatnonzero(folds != config.fold), np.flatnonzero(folds == config.fold)
        self.norm = Standardizer.fit(data.quality[train_idx])
        truth = (lambda idx: None if true_id_coeffs is None else true_id_coeffs[idx])
        self.train_sets = prepare_sets(data.subset(train_idx), self.basis, self.norm, true_id_coeffs=truth(train_idx))
        self.val_sets = prepare_sets(data.subset(val_idx), self.basis, self.norm, true_id_coeffs=truth(val_idx))
        self.basis_t = self.basis.torch()
        self.device = torch.device("cpu")  # where the sets and basis_t live
        self.layout_json = data.layout.to_json()
        self.model_config = CNetConfig(input_dim=data.quality.shape[1], n_id=data.id_coeffs.shape[1],
                                       **(model_overrides or {})).to_dict()
        self.loss_config = loss_config or CNetLossConfig()
        self.n_feature = data.n_feature

    def build_model(self):
        return create_model("cnet", **self.model_config)

    def _move_to(self, device) -> None:
        """Sets and basis onto the training device (once; they are built on the CPU)."""
        device = torch.device(device)
        if device != self.device:
            self.train_sets, self.val_sets = self.train_sets.to(device), self.val_sets.to(device)
            self.basis_t = self.basis_t.to(device)
            self.device = device

    def train_epoch(self, model, optimizer, epoch: int, rank: int, world: int, device) -> dict:
        from facedist.training.cnet import cnet_loss, sample_sets

        self._move_to(device)
        rng = np.random.default_rng(self.config.seed * 1000 + epoch * 10 + rank)
        groups = self.train_sets.groups()
        mine = groups[rank::world] if len(groups) >= world else groups
        loss_sum, count = 0.0, 0
        for _ in range(self.config.steps_per_epoch):
            chosen = rng.choice(mine, min(self.config.batch_size, len(mine)), replace=False)
            index, mask = sample_sets(self.train_sets, chosen, self.config.set_size, rng)
            loss, relative = cnet_loss(model, self.train_sets, self.basis_t, index, mask, self.loss_config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * int(mask.sum())
            count += int(mask.sum())
        return {"loss": loss_sum, "count": count}

    def evaluate(self, model, rank: int, world: int, device) -> dict:
        from facedist.training.cnet import evaluate_sets

        self._move_to(device)
        groups = self.val_sets.groups()
        mine = groups[rank::world]
        if len(mine) == 0:
            return {k: 0.0 for k in ("loo_cnet", "loo_mean", "loo_count", "truth_cnet", "truth_mean", "truth_count")}
        return evaluate_sets(model, self.val_sets, self.basis_t, set_size=self.config.combo_size,
                             groups=mine, seed=self.config.seed)

    def summarize(self, sums: dict) -> dict:
        from facedist.training.cnet import summarize_sets_eval

        out = summarize_sets_eval(sums)
        if not sums.get("loo_count"):
            # No validation person has two photos: leave-one-out has nothing to predict, both
            # errors read 0 and a "gain" would be meaningless.
            out.update(degenerate=True, loo_gain_vs_mean=float("nan"))
        else:
            out["loo_gain_vs_mean"] = 1 - out["loo_error_cnet"] / max(out["loo_error_mean"], 1e-12)
        return out

    def bundle(self, state: dict, metrics: dict) -> dict:
        return make_bundle(task="cnet", model_config={"name": "cnet", **self.model_config}, state_dict=state,
                           labels=[], layout_json=self.layout_json, input_norm=self.norm.to_dict(),
                           metrics=_jsonable(metrics), extra={"n_feature": self.n_feature, "fold": self.config.fold,
                                                              "folds": self.config.folds})
