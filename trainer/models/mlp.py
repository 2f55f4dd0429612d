"""A plain MLP classifier (ReLU hidden layers) for the digits data set."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MLPConfig:
    in_dim: int
    n_classes: int
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.0


class MLP(nn.Module):
    """``layers.<i>`` are the Linear layers; the last one is the classifier.

    ``forward(x, hidden_layers=...)`` also returns the activations after hidden layer ``i``
    (1-based; 0 = the input).
    """

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        dims = [cfg.in_dim, *cfg.hidden, cfg.n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def width(self) -> int:
        return self.cfg.hidden[-1] if self.cfg.hidden else self.cfg.in_dim

    def forward(self, x: torch.Tensor, hidden_layers: tuple[int, ...] = ()):
        hidden = {0: x} if 0 in hidden_layers else {}
        for i, layer in enumerate(self.layers[:-1], start=1):
            x = self.drop(F.relu(layer(x)))
            if i in hidden_layers:
                hidden[i] = x
        logits = self.layers[-1](x)
        return (logits, hidden) if hidden_layers else logits
