"""A plain MLP classifier (ReLU hidden layers) for the digits data set."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.protocol import ConfigFieldError, ModelFamily, register


@dataclass
class MLPConfig:
    in_dim: int
    n_classes: int
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if any(width < 1 for width in self.hidden):
            raise ConfigFieldError("hidden", f"every width must be >= 1 (got {list(self.hidden)})")
        if not 0 <= self.dropout < 1:
            raise ConfigFieldError("dropout", f"must be in [0, 1) (got {self.dropout})")


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

    def forward(self, x: torch.Tensor, hidden_layers: tuple[int, ...] = ()):
        hidden = {0: x} if 0 in hidden_layers else {}
        for i, layer in enumerate(self.layers[:-1], start=1):
            x = self.drop(F.relu(layer(x)))
            if i in hidden_layers:
                hidden[i] = x
        logits = self.layers[-1](x)
        return (logits, hidden) if hidden_layers else logits


class MLPFamily(ModelFamily[MLP]):
    """The digits MLP through the model protocol: no decoder layers (FSDP2 shards it as one unit), no pipeline."""

    name, model_class, config_class, task = "mlp", MLP, MLPConfig, "classify"

    def build(self, config: MLPConfig) -> MLP:
        return MLP(config)

    def config(self, model: MLP) -> MLPConfig:
        return model.cfg

    def depth(self, config: MLPConfig) -> int:
        return len(config.hidden)

    def layers(self, model: MLP) -> dict[str, nn.Module]:
        return {}

    def width(self, model: MLP) -> int:
        """The last hidden layer's width (what feature distillation projects)."""
        return model.cfg.hidden[-1] if model.cfg.hidden else model.cfg.in_dim

    def vocab_size(self, model: MLP) -> int:
        return model.cfg.n_classes


register(MLPFamily())
