"""One training preset per task: what train, run and report start from."""

from __future__ import annotations

import pytest

from facedist.training.engine import TrainConfig
from facedist.training.presets import HEAD_PRESETS, TASK_PRESETS, describe_presets, preset_config, preset_value
from facedist.training.task_registry import TASKS


def test_every_task_has_a_preset_and_it_is_applied():
    assert set(TASK_PRESETS) == set(TASKS)
    for task in TASKS:
        config = preset_config(task)
        assert config.task == task
        # the task's preset, then what its head changes (the light heads' ridge, last epoch, ...)
        head = TASK_PRESETS[task].get("head", TrainConfig.head)
        for name, value in {**TASK_PRESETS[task], **HEAD_PRESETS.get((task, head), {})}.items():
            assert getattr(config, name) == value, (task, name)


def test_another_head_takes_that_heads_settings():
    linear, resnet = preset_config("gender", head="linear"), preset_config("gender", head="resnet")
    assert (linear.select, linear.l2) == ("last", HEAD_PRESETS[("gender", "linear")]["l2"])
    assert (resnet.select, resnet.l2, resnet.epochs) == ("best", 0.0, TASK_PRESETS["gender"]["epochs"])
    assert preset_config("gender", head="linear", l2=0.5).l2 == 0.5  # a given value still wins


def test_given_values_win_and_unset_ones_keep_the_preset():
    config = preset_config("identity", epochs=3, patience=None, fold=2, seed=7)
    assert (config.epochs, config.fold, config.seed) == (3, 2, 7)
    assert config.patience == TASK_PRESETS["identity"]["patience"]


def test_unknown_tasks_and_settings_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        preset_config("height")
    with pytest.raises(TypeError, match="not TrainConfig fields"):
        preset_config("identity", epoch=3)


def test_help_text_names_each_tasks_default():
    assert preset_value("expression", "warmup_epochs") == TrainConfig.warmup_epochs  # in no preset: TrainConfig's
    text = describe_presets("epochs", ("identity", "cnet"))
    assert text == f"identity {preset_value('identity', 'epochs')}, cnet {preset_value('cnet', 'epochs')}"
    assert describe_presets("warmup_epochs", ("identity", "expression")) == str(TrainConfig.warmup_epochs)
    assert describe_presets("inputs", ("gender",)) == ",".join(preset_value("gender", "inputs"))
