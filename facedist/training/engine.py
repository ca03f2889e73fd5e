"""One training loop for every task, ray-free: it runs in-process (k-fold reports, benchmarks)
and inside each Ray Train worker (facedist.training.distributed), where torch.distributed is up.

A task (facedist.training.tasks) provides the data, the model and three functions: train one
epoch on this rank's shard, evaluate this rank's shard as sums, and summarise the all-reduced
sums. The loop adds what every task needs: AdamW with warm-up + cosine schedule, early stopping
on the task's monitored metric, per-epoch metrics reduced across workers, seconds per training
input, and a resumable state (what a checkpoint holds besides the servable bundle).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

TRAINER_STATE_FILE = "trainer_state.pt"
SELECTS = ("best", "last")  # TrainConfig.select


@dataclass
class TrainConfig:
    task: str                                   # cnet | identity | expression | gender | image_identity | image_expression
    data: str = ""                              # coefficients table: local or s3://, file or directory
    output: str | None = None                   # storage for checkpoints and the final bundle
    name: str | None = None                     # run name (same name + output = resume)
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    patience: int = 10                          # early stopping, in epochs without improvement
    # Which epoch's model the bundle keeps: "best" on validation, or "last" (for a head whose
    # loss has its own regularised optimum: a few hundred validation inputs pick a lucky epoch).
    select: str = "best"
    # After the epochs on the training split (whose last epoch's validation metrics are reported),
    # train the same recipe again from scratch on the training and validation rows together and
    # ship that (needs select="last": nothing is picked on the validation rows). On a few hundred
    # inputs a fifth more rows is worth more than a validation split the head does not use.
    refit: bool = False
    seed: int = 0
    folds: int = 3                              # k-fold split by image; this run validates on `fold`
    fold: int = 0
    combo_size: int = 3                         # identity inputs: C(n, combo_size) per subject
    max_combos_per_subject: int = 120
    # Identity: with many people the per-person cap shrinks so that an epoch holds about this many
    # combinations (at least 4 per person); None or 0: no bound. Keeps a report on a large table short.
    max_combos_per_epoch: int | None = None
    cnet: str | None = None                     # C-Net bundle dir for identity aggregation
    # "mean" | "cnet" (needs --cnet). The mean by default; why: docs/results/cnet_degraded
    # (benchmarks/cnet_degraded.py).
    aggregate: str = "mean"
    input_norm: str = "within_class"            # classifier inputs: "within_class" whitening | "standard"
    # The descriptor groups a classifier reads side by side (schema.INPUT_GROUPS: id, exp, tex,
    # feature, ...); None: the task's default (tasks.DEFAULT_INPUTS). The bundle records them.
    inputs: tuple[str, ...] | None = None
    head: str = "resnet"                        # "resnet" (the paper's 1-D ResNet-34 / -32) | "linear" | "mlp"
    # A linear head starts from the class means of its normalised training inputs (a nearest-
    # class-mean classifier, by cosine with within_class_cosine) instead of random weights: a
    # class seen in one photo then starts where its photo is, not behind the classes seen twice.
    prototype_init: bool = False
    # L2 penalty on the classifier's weight matrices, in the loss (a ridge: AdamW's decoupled decay
    # barely holds a linear head on a few hundred inputs), per input dimension of the normalised input.
    l2: float = 0.0
    noise: float = 1.0                          # augmentation: Gaussian noise in input_norm units (with
                                                # within-class whitening: one within-class std)
    dropout: float = 0.1
    steps_per_epoch: int = 20                   # C-Net: sampled batches of sets per epoch
    set_size: int = 6                           # C-Net: images per training set
    labels: list[str] | None = None             # restrict/order the class list (e.g. Yale's 6 expressions)
    image_size: int = 112                       # image baseline crops
    num_workers: int = 1                        # Ray Train workers
    use_gpu: bool | None = None                 # None: when the cluster has GPUs
    cpus_per_worker: float = 1.0
    keep_checkpoints: int = 2
    max_failures: int = 3                       # worker/node losses recovered from the latest checkpoint
    max_epoch_seconds: float | None = None      # optional cap per epoch (benchmarks)
    # Ray Train: a checkpoint after the last epoch, and between epochs after at most this many
    # seconds of training (a checkpoint per epoch of a light head costs more than its epoch).
    checkpoint_every_s: float = 10.0
    # How Ray Train workers get the table (training.sharded): "shards" (Ray Data, each worker its
    # people's rows of the task's columns), "table" (every worker reads the whole table), "auto"
    # (shards where the task supports them, identity with the mean, gender, expression, on tables
    # of sharded.SHARDS_MIN_ROWS rows or more).
    ingest: str = "auto"
    # Identity on shards: new combinations every epoch (from each person's photos) instead of
    # one draw for the run.
    redraw_combos: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    best_state: dict
    best_metrics: dict
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    last_state: dict | None = None   # the weights after the last epoch run (where no validation may pick one)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sums(sums: dict, op: str = "sum") -> dict:
    """Sum (or max) a dict of floats/tensors across workers; identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sums.items()}
    out = {}
    for key, value in sums.items():
        tensor = value.clone().double() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        out[key] = tensor.cpu() if torch.is_tensor(value) else float(tensor)
    return out


def peak_rss_per_rank(rank: int, world_size: int) -> list[float]:
    """Every rank's peak resident memory so far, MB (getrusage), as a list indexed by rank."""
    import resource

    mine = torch.zeros(world_size, dtype=torch.float64)
    mine[rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [round(float(v), 1) for v in all_reduce_sums({"rss": mine})["rss"]]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 5% over the remaining epochs."""
    def factor(epoch: int) -> float:
        if epoch < config.warmup_epochs:
            return (epoch + 1) / (config.warmup_epochs + 1)
        span = max(config.epochs - config.warmup_epochs, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))
    return factor


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has it for the model's device: one kernel for all
    parameters, since on CPU the update of a 1-D ResNet-34's 7M parameters is a large part of a
    step."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def fit(task, config: TrainConfig, *, wrap_model: Callable = lambda m: m, device: str | torch.device = "cpu",
        resume: dict | None = None, on_epoch: Callable | None = None) -> FitResult:
    """Train ``task`` under ``config``.

    resume: a trainer state (see ``trainer_state``) to continue from. on_epoch(metrics,
    save) is called after every epoch on every rank; ``save(directory)`` writes the checkpoint
    (bundle of the best model so far + trainer state) and is meant for rank 0."""
    if config.select not in SELECTS:
        raise ValueError(f"select {config.select!r}: choose one of {SELECTS}")
    rank, world_size = world()
    torch.manual_seed(config.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model = task.build_model().to(device)
    optimizer_state = scheduler_state = None
    start_epoch, history = 0, []
    monitor, mode = task.monitor
    best_value = -math.inf if mode == "max" else math.inf
    best_state, best_metrics, bad_epochs = None, {}, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer_state, scheduler_state = resume["optimizer"], resume["scheduler"]
        start_epoch, history = resume["epoch"] + 1, list(resume["history"])
        best_value, best_state, best_metrics = resume["best_value"], resume["best_state"], resume["best_metrics"]
        bad_epochs = resume["bad_epochs"]
    model = wrap_model(model)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)

    if config.refit and (config.select != "last" or not hasattr(task, "use_all_rows")):
        raise ValueError("refit needs select='last' (the refit has no validation rows to select on) "
                         "and a classifier over fixed inputs")
    total_epochs = config.epochs * (2 if config.refit else 1)
    if config.refit and start_epoch >= config.epochs:   # resumed inside the refit
        task.use_all_rows()
    stopped = False
    for epoch in range(start_epoch, total_epochs):
        refitting = config.refit and epoch >= config.epochs
        if config.refit and epoch == config.epochs:
            # The same recipe from scratch on every row; the reported metrics stay the validation run's.
            task.use_all_rows()
            torch.manual_seed(config.seed)
            model = wrap_model(task.build_model().to(device))
            optimizer = make_optimizer(model, config)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        if bad_epochs >= config.patience:
            stopped = True
            break
        model.train()
        started = time.perf_counter()
        train_sums = task.train_epoch(model, optimizer, epoch, rank, world_size, device)
        train_seconds = time.perf_counter() - started
        scheduler.step()
        train_sums = all_reduce_sums(train_sums)
        slowest = all_reduce_sums({"seconds": train_seconds}, op="max")["seconds"]
        model.eval()
        with torch.no_grad():
            val_sums = all_reduce_sums(task.evaluate(unwrap(model), rank, world_size, device))
        epoch_seconds = all_reduce_sums({"seconds": time.perf_counter() - started}, op="max")["seconds"]
        metrics = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": train_sums["loss"] / max(train_sums["count"], 1),
                   "train_inputs": int(train_sums["count"]), "train_seconds": slowest,
                   "seconds_per_input": slowest / max(train_sums["count"], 1), "workers": world_size,
                   "epoch_seconds": epoch_seconds,   # training and validation, the slowest worker
                   "peak_rss_mb": peak_rss_per_rank(rank, world_size)}
        metrics.update(task.summarize(val_sums))
        value = metrics[monitor]
        improved = value > best_value if mode == "max" else value < best_value
        if refitting:   # the validation rows are training rows now: their metrics pick nothing
            metrics["refit"] = True
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()})
        elif improved or best_state is None or config.select == "last":
            best_value, bad_epochs = value, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()})
            best_metrics = dict(metrics)
        else:
            bad_epochs += 1
        metrics["best_" + monitor] = best_value
        # The loop ends after this epoch: the caller's last chance to checkpoint.
        metrics["final"] = epoch == total_epochs - 1 or bad_epochs >= config.patience
        history.append(metrics)

        def save(directory: str, _epoch=epoch) -> None:
            from facedist.training.bundle import save_model_bundle

            save_model_bundle(task.bundle(best_state, best_metrics), directory)
            state = {"epoch": _epoch, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "best_value": best_value, "best_state": best_state,
                     "best_metrics": best_metrics, "bad_epochs": bad_epochs, "history": history,
                     "config": config.to_dict()}
            torch.save(state, f"{directory}/{TRAINER_STATE_FILE}")

        if on_epoch is not None:
            on_epoch(metrics, save)
    last_state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    return FitResult(best_state, best_metrics, history, stopped, last_state)


def load_trainer_state(directory: str) -> dict:
    return torch.load(f"{directory}/{TRAINER_STATE_FILE}", map_location="cpu", weights_only=False)
