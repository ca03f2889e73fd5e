"""Small classifier heads over a descriptor vector (B, D) -> (B, classes): the light alternatives
to the paper's 1-D ResNets, for inputs that are already whitened (training.tasks).

- ``linear_head``: one affine layer (multinomial logistic regression), with optional dropout on
  the input.
- ``mlp_head``: one hidden layer (LayerNorm-free: the inputs arrive standardised) with GELU and
  dropout.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearHead(nn.Module):
    def __init__(self, input_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(input_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class MLPHead(nn.Module):
    def __init__(self, input_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


def linear_head(input_dim: int, num_classes: int, dropout: float = 0.0) -> LinearHead:
    return LinearHead(input_dim, num_classes, dropout)


def mlp_head(input_dim: int, num_classes: int, dropout: float = 0.0, hidden: int = 256) -> MLPHead:
    return MLPHead(input_dim, num_classes, hidden, dropout)
