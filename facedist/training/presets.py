"""One training preset per task: the settings `facedist train`, `facedist run` and `facedist
report` all start from, so the report measures the settings that make the shipped bundles.

A preset holds only what differs from TrainConfig's defaults. Callers add what they own (data,
output, fold, seed, workers) and the user's explicit flags; `preset_config` applies them in
that order. Changing a preset changes every command at once: that is the point.
"""

from __future__ import annotations

from dataclasses import fields

from facedist.training.engine import TrainConfig
from facedist.training.task_registry import TASKS

TASK_PRESETS: dict[str, dict] = {
    # C-Net: small sets sampled per step; its loss is noisy, so a higher rate and short patience.
    "cnet": {"epochs": 30, "lr": 3e-3, "batch_size": 16, "set_size": 6, "steps_per_epoch": 10, "patience": 8},
    # Identity: C(n, 3) combinations per person, capped so a person with many photos costs a
    # bounded number of inputs per epoch (40, not C(14, 3) = 364), and with many people the cap
    # shrinks so an epoch stays near 1,200 inputs (72 people x 14 photos: 16 each).
    # The shipped inputs and heads: the best on people never seen in training (report --protocol
    # person on London and Yale, docs/results.md); the other settings are the 1-D ResNets'.
    "identity": {"epochs": 40, "batch_size": 32, "patience": 8, "max_combos_per_subject": 40,
                 "max_combos_per_epoch": 1200, "inputs": ("emb", "id", "tex"), "head": "linear"},
    "gender": {"epochs": 40, "batch_size": 32, "patience": 12, "inputs": ("emb",), "head": "linear"},
    "expression": {"epochs": 40, "batch_size": 16, "patience": 12, "inputs": ("exp", "tex", "expf", "feature"),
                   "head": "linear"},
    # Age: a ridge over the inputs that did best on London split by person (scripts/age_by_person.py,
    # docs/results.md "Age on London, split by person").
    "age": {"epochs": 40, "batch_size": 64, "patience": 12, "inputs": ("emb", "fage"), "head": "linear"},
    # Validated on the identity preset's combinations of 3 (the same caps).
    "image_identity": {"epochs": 15, "batch_size": 16, "patience": 8, "image_size": 224,
                       "max_combos_per_subject": 40, "max_combos_per_epoch": 1200},
    "image_expression": {"epochs": 15, "batch_size": 16, "patience": 8, "image_size": 224},
}
assert set(TASK_PRESETS) == set(TASKS), "every task needs a preset"

# What a head changes in its task's preset. The light heads over a few hundred inputs: a ridge
# (l2) and the last epoch (select) instead of early stopping on a small validation split; the
# 1-D ResNets keep the task presets above (the paper's settings).
_LIGHT = {"input_norm": "standard", "noise": 0.0, "lr": 1e-2, "weight_decay": 0.0, "l2": 3e-3,
          "epochs": 100, "select": "last", "batch_size": 64, "folds": 5}
HEAD_PRESETS: dict[tuple[str, str], dict] = {
    ("gender", "linear"): _LIGHT,
    # Expression reads groups of 10 to 256 dimensions side by side: each scaled to unit total
    # variance (per_group), a ridge on that scale, and the last epoch's recipe refitted on every
    # row (on London and Yale split by person: docs/results.md).
    ("expression", "linear"): {**_LIGHT, "input_norm": "per_group", "l2": 3e-4, "refit": True},
    ("gender", "mlp"): {**_LIGHT, "dropout": 0.2},
    # With every group standardised alike, the 256- and 512-wide groups drown β and the MLP fits
    # noise (chance on Yale); per group, it reads them as the linear head does.
    ("expression", "mlp"): {**_LIGHT, "input_norm": "per_group", "dropout": 0.2},
    # Age: each group at unit total variance (a 1-d face-api age beside a 128-d e), a ridge that
    # starts at its exact solution (RegressorTask), so a few quiet epochs (no dropout, a low rate),
    # refitted on every row.
    ("age", "linear"): {**_LIGHT, "input_norm": "per_group", "l2": 1e-2, "refit": True, "dropout": 0.0,
                        "lr": 1e-3, "epochs": 20},
    ("age", "mlp"): {**_LIGHT, "input_norm": "per_group", "dropout": 0.2},
    ("age", "resnet"): {"input_norm": "standard"},
    # Identity over people seen in few photos: within-person whitening, then cosine; the linear
    # head starts as the nearest class mean and is fine-tuned briefly.
    ("identity", "linear"): {"input_norm": "within_class_cosine", "prototype_init": True, "noise": 0.0,
                             "lr": 1e-3, "weight_decay": 0.0, "epochs": 20, "select": "last"},
    ("identity", "mlp"): {"input_norm": "within_class_cosine", "noise": 0.0, "weight_decay": 0.0,
                          "l2": 1e-4, "epochs": 60, "select": "last", "batch_size": 64},
}

_FIELDS = {f.name for f in fields(TrainConfig)}


def preset_config(task: str, **overrides) -> TrainConfig:
    """TrainConfig for ``task``: its preset, then ``overrides`` (None values are ignored, so a
    flag left unset keeps the preset's value)."""
    if task not in TASK_PRESETS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    unknown = set(overrides) - _FIELDS
    if unknown:
        raise TypeError(f"not TrainConfig fields: {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    head = given.get("head", TASK_PRESETS[task].get("head", TrainConfig.head))
    values = {**TASK_PRESETS[task], **HEAD_PRESETS.get((task, head), {}), **given}
    return TrainConfig(task=task, **values)


def shipped_inputs(task: str, available) -> tuple[str, ...]:
    """The preset's descriptor groups that a table has (``available``: CoefficientData.available_inputs()
    or the groups whose columns it holds); the task's default when it has none of them. A table
    extracted with --no-face-embedding still trains, on what it has."""
    from facedist.schema import DEFAULT_INPUTS
    from facedist.training.tasks import task_inputs

    kept = tuple(g for g in task_inputs(preset_config(task)) if g in set(available))
    return kept or DEFAULT_INPUTS[task]


def preset_value(task: str, name: str):
    """The value ``task`` trains with when ``name`` is not given."""
    return getattr(preset_config(task), name)


def describe_presets(name: str, tasks=TASKS) -> str:
    """A flag's per-task defaults for --help, e.g. "cnet 30, identity 40, ..." (over ``tasks``)."""
    values = {task: preset_value(task, name) for task in tasks}
    values = {task: ",".join(v) if isinstance(v, tuple) else v for task, v in values.items()}
    if len(set(map(repr, values.values()))) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{task} {value}" for task, value in values.items())
