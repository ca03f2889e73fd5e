"""Training: C-Net (weakly supervised), coefficient classifiers and the image baseline.

Entry points for the CLI and jobs:
    run_training(TrainConfig)   Ray Train (TorchTrainer), checkpoints + resume, final bundle
    train_in_process(config)    the same loop without Ray (k-fold reports, benchmarks)
    save_model_bundle / load_model_bundle   the model bundle format (see bundle.py)
"""

from facedist.training.bundle import load_model_bundle, save_model_bundle
from facedist.training.engine import TrainConfig


def run_training(config: TrainConfig, address: str | None = None) -> dict:
    from facedist.training.distributed import run_training as _run

    return _run(config, address=address)


def train_in_process(config: TrainConfig, data=None, task=None, on_epoch=None):
    """engine.fit on one process; returns (task, FitResult). ``data``: a CoefficientData to skip
    reading config.data; ``task``: a prebuilt task."""
    from facedist.training.data import TRAINING_COLUMNS, load_data
    from facedist.training.engine import fit
    from facedist.training.task_registry import make_task

    if task is None:
        task = make_task(config, data if data is not None else load_data(config.data, columns=TRAINING_COLUMNS))
    return task, fit(task, config, on_epoch=on_epoch)


def train_and_save(config: TrainConfig, data, directory: str) -> str:
    """train_in_process on ``data``, then the best model's bundle into ``directory``; returns the
    bundle's URI (scripts and tests that need small real bundles)."""
    task, result = train_in_process(config, data=data)
    return save_model_bundle(task.bundle(result.best_state, result.best_metrics), directory)


__all__ = ["TrainConfig", "load_model_bundle", "run_training", "save_model_bundle", "train_and_save",
           "train_in_process"]
