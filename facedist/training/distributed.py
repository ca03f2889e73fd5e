"""Ray Train adapter (thin): runs engine.fit in every worker of a TorchTrainer.

Per worker: its rows of the table as a Ray Data shard (identity, gender, expression:
training.sharded plans the split on the driver and each worker reads only its people's rows of
the task's columns), or the whole table (C-Net, the image baseline, --ingest table: tasks slice
their data by rank/world); build the task, wrap the model in DDP (ray.train.torch.prepare_model), reduce metrics with
torch.distributed. Rank 0 writes a checkpoint after the last epoch and every checkpoint_every_s
of training (the servable bundle of the best model so far + the trainer state) to the run's storage; running again with the same --output and
--name continues from the latest checkpoint (Ray Train restores the run from its storage).
At the end the best bundle is copied to <output>/<task>/model.pt with metrics.json beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from facedist import runtime, storage
from facedist.training.engine import TrainConfig


def describe_best(best: dict) -> str:
    """A run's best epoch in words, with the metric keys the task reports: accuracy and macro-F1
    for classifiers, the mean absolute error for a regressor (age), C-Net's leave-one-out errors (vs the plain mean) for cnet."""
    if best.get("accuracy") is not None:
        text = f"validation accuracy {best['accuracy']:.3f}"
        if best.get("macro_f1") is not None:
            text += f", macro_f1 {best['macro_f1']:.3f}"
    elif best.get("mae") is not None:
        text = f"validation MAE {best['mae']:.2f} years (predicting the mean age: {best.get('mae_baseline', float('nan')):.2f})"
    elif best.get("degenerate"):
        text = ("not validated: no validation person has 2 or more photos, so C-Net's leave-one-out error "
                "has nothing to predict (the classifiers aggregate by the mean unless --aggregate cnet)")
    elif best.get("loo_error_cnet") is not None:
        nan = float("nan")
        text = (f"loo_error_cnet {best['loo_error_cnet']:.4f} vs loo_error_mean {best.get('loo_error_mean', nan):.4f}"
                f" (loo_gain_vs_mean {best.get('loo_gain_vs_mean', nan):+.3f})")
    else:
        text = ", ".join(f"{k} {v:.4g}" for k, v in best.items() if isinstance(v, float))
    return f"{text}; best epoch {best.get('epoch')}"


def run_name(config: TrainConfig) -> str:
    return config.name or f"{config.task}-fold{config.fold}"


def _worker_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from facedist.training.data import TRAINING_COLUMNS, load_data
    from facedist.training.engine import fit, load_trainer_state
    from facedist.training.task_registry import make_task

    os.environ.update(loop_config.pop("_env", {}))
    shards = loop_config.pop("_shards", None)
    config = TrainConfig(**loop_config)
    torch.set_num_threads(max(1, int(round(config.cpus_per_worker))))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if shards is not None:
        # This worker's rows only, from its Ray Data shard (training.sharded).
        from facedist.training.sharded import task_from_shard

        shard = ray.train.get_dataset_shard(f"shard_{rank}")
        task = task_from_shard(config, shards, shard.iter_batches(batch_size=None, batch_format="numpy"), rank)
    else:
        task = make_task(config, load_data(config.data, columns=TRAINING_COLUMNS))
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = load_trainer_state(directory)

    since_checkpoint = [0.0]

    def on_epoch(metrics: dict, save) -> None:
        # Every rank reports the same epochs (a report waits for all of them): decided on the
        # slowest rank's training seconds, which every rank has. A report costs a round trip to
        # the controller, more than a light head's epoch, so epochs between checkpoints send none.
        since_checkpoint[0] += metrics["train_seconds"]
        if not (metrics["final"] or since_checkpoint[0] >= config.checkpoint_every_s):
            return
        since_checkpoint[0] = 0.0
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save(directory)
                # This worker's S3 counts so far (retries of its checkpoint uploads) for the summary.
                ray.train.report({**metrics, "storage": storage.stats_report(storage.stats_snapshot())},
                                 checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)

    fit(task, config, wrap_model=ray.train.torch.prepare_model, device=ray.train.torch.get_device(),
        resume=resume, on_epoch=on_epoch)


def run_training(config: TrainConfig, address: str | None = None) -> dict:
    """Train with Ray Train (joins the cluster facedist.runtime.connect picks: address,
    RAY_ADDRESS, or a local one) and return a summary: final metrics, per-epoch history, where
    the bundle went."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from facedist.training.sharded import plan_shards, shard_dataset, uses_shards

    if not config.output:
        raise ValueError("run_training needs config.output (local path or s3://)")
    config = dataclasses.replace(config, data=storage.absolute(config.data), output=storage.absolute(config.output),
                                 cnet=storage.absolute(config.cnet))
    storage_before = storage.stats_snapshot()
    ray = runtime.connect(address)
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    filesystem, path = storage.filesystem_for(config.output)
    loop_config = config.to_dict()
    # Also through the loop's config: a cluster started elsewhere did not get this process's environment.
    loop_config["_env"] = runtime.worker_env()
    datasets, dataset_config = None, None
    if uses_shards(config):
        from ray.train import DataConfig

        # The driver plans the split from a few columns; each worker gets a dataset of its rows.
        plan = plan_shards(config, config.num_workers)
        loop_config["_shards"] = plan.meta()
        datasets = {f"shard_{r}": shard_dataset(plan, r) for r in range(config.num_workers)}
        dataset_config = DataConfig(datasets_to_split=[])   # worker r reads shard_r only
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=loop_config, datasets=datasets, dataset_config=dataset_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": config.cpus_per_worker}),
        run_config=RunConfig(name=run_name(config), storage_path=path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                             # A lost worker or node restarts the workers from the latest checkpoint.
                             failure_config=FailureConfig(max_failures=config.max_failures)))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    bundle_dir = storage.join(config.output, config.task)
    history = []
    with result.checkpoint.as_directory() as directory:
        from facedist.training.bundle import BUNDLE_FILE
        from facedist.training.engine import load_trainer_state

        with open(os.path.join(directory, BUNDLE_FILE), "rb") as fh:
            storage.write_bytes(storage.join(bundle_dir, BUNDLE_FILE), fh.read())
        state = load_trainer_state(directory)
        history = state["history"]
        best = state["best_metrics"]
    summary = {"task": config.task, "run": run_name(config), "bundle": bundle_dir,
               "checkpoint": result.checkpoint.path, "best": best, "history": history,
               "workers": config.num_workers, "use_gpu": use_gpu, "aggregate": config.aggregate,
               # S3 counts (operations, retries per error kind): this driver's, and rank 0's up to
               # its last report (a restarted worker counts from its restart).
               "storage": {"driver": storage.stats_report(storage.stats_since(storage_before)),
                           "rank0": (result.metrics or {}).get("storage")}}
    storage.write_bytes(storage.join(bundle_dir, "metrics.json"), json.dumps(summary, indent=2, default=str).encode())
    return summary
