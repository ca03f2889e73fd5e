"""The image baseline: a 2-D ResNet-34 on aligned face crops, on the same split as the
coefficient classifiers (identity: same training images, same validation combinations, the
combination's prediction = mean of its images' logits; expression: same folds).

Crops: a square around the 68 detected landmarks (1.25x their extent), grey, resized to
image_size and repeated to 3 channels (the Yale photos are grey anyway).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from facedist.training.data import (CoefficientData, combos_per_subject, encode_labels, group_combinations,
                                    image_folds)
from facedist.training.engine import TrainConfig
from facedist.training.tasks import ClassifierTask, LABEL_COLUMN, _jsonable, _shard, confusion_matrix
from facedist.training.bundle import make_bundle
from facedist.models.registry import create_model


def face_crop(image: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """(size, size) uint8 grey crop centred on the landmarks."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    lo, hi = np.nanmin(landmarks, 0), np.nanmax(landmarks, 0)
    centre, half = (lo + hi) / 2, 0.625 * float(np.max(hi - lo))
    scale = size / (2 * half)
    matrix = np.array([[scale, 0, size / 2 - scale * centre[0]], [0, scale, size / 2 - scale * centre[1]]])
    return cv2.warpAffine(grey, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def load_crops(data: CoefficientData, size: int) -> np.ndarray:
    """(N, size, size) uint8 crops of every row (read through facedist.storage: local or s3://)."""
    from facedist import storage
    from facedist.images import decode_image

    crops = np.zeros((len(data), size, size), np.uint8)
    for i, path in enumerate(data.path):
        crops[i] = face_crop(decode_image(storage.read_bytes(str(path))), data.landmarks[i], size)
    return crops


class ImageTask(ClassifierTask):
    """ClassifierTask over crops; validation groups (combos) average their images' logits."""

    def __init__(self, config: TrainConfig, crops_train, y_train, crops_val, y_val, labels, layout_json,
                 val_groups: np.ndarray | None, extra: dict):
        self.config = config
        self.labels = labels
        self.x_train = torch.as_tensor(crops_train)
        self.y_train = torch.as_tensor(y_train)
        self.x_val = torch.as_tensor(crops_val)
        self.val_groups = None if val_groups is None else torch.as_tensor(val_groups)
        self.y_val = torch.as_tensor(y_val)        # one label per validation group (or image)
        self.layout_json = layout_json
        self.model_name = "resnet34"  # facedist.models.registry
        self.model_config = {"num_classes": len(labels), "in_channels": 3}
        self.extra = extra
        self.norm = None

    def build_model(self):
        return create_model(self.model_name, **self.model_config)

    @staticmethod
    def _to_input(crops: torch.Tensor) -> torch.Tensor:
        x = (crops.float() / 255.0 - 0.5) / 0.25
        return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    def augment(self, crops: torch.Tensor) -> torch.Tensor:
        """Random horizontal flip and a shift of up to 1/16 of the side."""
        x = self._to_input(crops)
        flip = torch.rand(x.shape[0]) < 0.5
        x[flip] = x[flip].flip(-1)
        pad = max(x.shape[-1] // 16, 1)
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,)).tolist()  # torch's generator: fit seeds it
        return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]

    def evaluate(self, model, rank: int, world: int, device) -> dict:
        n_items = len(self.y_val)
        index = _shard(n_items, rank, world)
        n = len(self.labels)
        if len(index) == 0:
            return {"confusion": torch.zeros(n, n, dtype=torch.float64), "val_loss": 0.0}
        preds, losses = [], 0.0
        for start in range(0, len(index), 64):
            chunk = index[start:start + 64]
            if self.val_groups is None:
                logits = model(self._to_input(self.x_val[chunk]).to(device)).float().cpu()
            else:
                members = self.val_groups[chunk]                                  # (b, r)
                flat = model(self._to_input(self.x_val[members.reshape(-1)]).to(device)).float().cpu()
                logits = flat.reshape(members.shape[0], members.shape[1], -1).mean(1)
            losses += float(F.cross_entropy(logits, self.y_val[chunk], reduction="sum"))
            preds.append(logits.argmax(1))
        matrix = confusion_matrix(self.y_val[index].numpy(), torch.cat(preds).numpy(), n)
        return {"confusion": torch.as_tensor(matrix, dtype=torch.float64), "val_loss": losses}

    def bundle(self, state: dict, metrics: dict) -> dict:
        return make_bundle(task=self.config.task, model_config={"name": self.model_name, **self.model_config},
                           state_dict=state, labels=self.labels, layout_json=self.layout_json, input_norm=None,
                           metrics=_jsonable(metrics), extra=self.extra)


def make_image_task(config: TrainConfig, data: CoefficientData, crops: np.ndarray | None = None) -> ImageTask:
    """Same filtering and folds as tasks.make_classifier_task for identity / expression."""
    base = config.task.removeprefix("image_")
    column = LABEL_COLUMN[config.task]
    values = data.labels(column)
    keep = np.flatnonzero([v is not None and (config.labels is None or v in config.labels) for v in values])
    keep = keep[np.isfinite(data.landmarks[keep]).all(axis=(1, 2))]
    data = data.subset(keep)
    if crops is None:
        crops = load_crops(data, config.image_size)
    else:
        crops = crops[keep]
    codes, labels = encode_labels(data.labels(column), config.labels)
    extra = {"label_column": column, "fold": config.fold, "folds": config.folds, "image_size": config.image_size}
    if base == "identity":
        folds = image_folds(data.subject, config.folds, config.seed)
        train_idx, val_idx = np.flatnonzero(folds != config.fold), np.flatnonzero(folds == config.fold)
        # The identity task's validation combinations (same caps, same seed): the same 3 images.
        cap = combos_per_subject(config.max_combos_per_subject, config.max_combos_per_epoch, data.subject[val_idx])
        combos, owners = group_combinations(data.subject, val_idx, config.combo_size, cap, config.seed + 1)
        y_val, _ = encode_labels(owners, labels)
        return ImageTask(config, crops[train_idx], codes[train_idx], crops, y_val, labels, data.layout.to_json(),
                         combos, extra)
    folds = image_folds(data.expression, config.folds, config.seed)
    train_idx, val_idx = np.flatnonzero(folds != config.fold), np.flatnonzero(folds == config.fold)
    return ImageTask(config, crops[train_idx], codes[train_idx], crops[val_idx], codes[val_idx], labels,
                     data.layout.to_json(), None, extra)
