"""Every training task by name: the one place `--task` is resolved.

The coefficient tasks (C-Net, identity, expression, gender) live in tasks.py and the raw-image
baseline in image_baseline.py, which builds on tasks.py's ClassifierTask; this module imports
both, so neither imports the other's dispatcher (no import cycle).
"""

from __future__ import annotations

from facedist.training.data import CoefficientData
from facedist.training.engine import TrainConfig
from facedist.training.tasks import COEFFICIENT_TASKS, LABEL_COLUMN

IMAGE_TASKS = tuple(task for task in LABEL_COLUMN if task.startswith("image_"))
TASKS = ("cnet", *COEFFICIENT_TASKS, *IMAGE_TASKS)  # the CLI's --task choices


def make_task(config: TrainConfig, data: CoefficientData):
    """The task object engine.fit trains, for config.task."""
    if config.task == "cnet":
        from facedist.training.tasks import CNetTask

        return CNetTask(config, data)
    if config.task in COEFFICIENT_TASKS:
        from facedist.training.tasks import make_classifier_task

        return make_classifier_task(config, data)
    if config.task in IMAGE_TASKS:
        from facedist.training.image_baseline import make_image_task  # cv2 and crops: only when asked for

        return make_image_task(config, data)
    raise ValueError(f"unknown task {config.task!r}; choose one of {TASKS}")
