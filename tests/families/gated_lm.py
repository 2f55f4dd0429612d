"""A decoder family unlike Stillroom's GPT, written only for the tests: the proof that a family needs no edit
outside its own module.

Different on purpose: separate q/k/v/o projections with grouped-query attention (``n_kv_head`` key/value heads,
each shared by ``n_head // n_kv_head`` query heads), a gated (SwiGLU) MLP, RMSNorm, no position embedding, an
untied output head, and other attribute names (``embed``, ``layers``, ``norm``, ``lm_head``). Use it as
``student.arch=tests.families.gated_lm:gated`` (``+student.n_kv_head=...``, ``+student.mlp_hidden=...``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.protocol import FINAL_HIDDEN, ConfigFieldError, ModelFamily, UnitGroup, UnitSlice, register

NAME = f"{__name__}:gated"


@dataclass
class GatedLMConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 32
    mlp_hidden: int = 64
    dropout: float = 0.0
    # After thinning: key/value heads (each with its query heads) and MLP units per layer.
    kv_heads_per_layer: list[int] | None = None
    mlp_per_layer: list[int] | None = None

    def __post_init__(self) -> None:
        if self.n_head % self.n_kv_head:
            raise ConfigFieldError("n_kv_head", f"{self.n_kv_head} does not divide n_head={self.n_head}")
        if self.n_embd % self.n_head:
            raise ConfigFieldError("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")


class Attention(nn.Module):
    def __init__(self, cfg: GatedLMConfig, kv_heads: int):
        super().__init__()
        self.head_dim, self.group = cfg.n_embd // cfg.n_head, cfg.n_head // cfg.n_kv_head
        self.kv_heads = kv_heads
        self.q_proj = nn.Linear(cfg.n_embd, kv_heads * self.group * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(kv_heads * self.group * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.kv_heads * self.group, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        k, v = (t.repeat_interleave(self.group, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class GatedMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: GatedLMConfig, index: int):
        super().__init__()
        kv_heads = cfg.kv_heads_per_layer[index] if cfg.kv_heads_per_layer else cfg.n_kv_head
        hidden = cfg.mlp_per_layer[index] if cfg.mlp_per_layer else cfg.mlp_hidden
        self.attn_norm, self.attn = nn.RMSNorm(cfg.n_embd), Attention(cfg, kv_heads)
        self.mlp_norm, self.mlp = nn.RMSNorm(cfg.n_embd), GatedMLP(cfg.n_embd, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GatedLM(nn.Module):
    def __init__(self, cfg: GatedLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleDict({str(i): Layer(cfg, i) for i in range(cfg.n_layer)})
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, hidden_layers: tuple[int, ...] = ()):
        x = idx if idx.is_floating_point() else self.embed(idx)
        hidden = {0: x} if 0 in hidden_layers else {}
        for name, layer in self.layers.items():
            x = layer(x)
            if int(name) + 1 in hidden_layers:
                hidden[int(name) + 1] = x
        if self.lm_head is None:
            return x
        x = self.norm(x)
        if FINAL_HIDDEN in hidden_layers:
            hidden[FINAL_HIDDEN] = x
        logits = self.lm_head(x)
        return (logits, hidden) if hidden_layers else logits


class GatedFamily(ModelFamily):
    name, model_class, config_class = NAME, GatedLM, GatedLMConfig
    structured_units = pipelines = True

    def build(self, config: GatedLMConfig) -> GatedLM:
        return GatedLM(config)

    def config(self, model: GatedLM) -> GatedLMConfig:
        return model.cfg

    def depth(self, config: GatedLMConfig) -> int:
        return config.n_layer

    def layers(self, model: GatedLM) -> dict[str, nn.Module]:
        return dict(model.layers.items())

    def width(self, model: GatedLM) -> int:
        return model.cfg.n_embd

    def vocab_size(self, model: GatedLM) -> int:
        return model.cfg.vocab_size

    def embeddings(self, model: GatedLM) -> list[str]:
        return ["embed"]

    def outputs(self, model: GatedLM) -> list[str]:
        return ["norm", "lm_head"]

    def unit_groups(self, model: GatedLM) -> list[UnitGroup]:
        """Per layer: key/value heads, each with its query heads and its o_proj columns (a unit whose v rows are
        masked outputs zero); MLP units, each a gate row, an up row and a down column (zero when either row is)."""
        groups = []
        for name, layer in model.layers.items():
            a, m = f"layers.{name}.attn", f"layers.{name}.mlp"
            attn, head_dim = layer.attn, layer.attn.head_dim
            groups.append(
                UnitGroup(
                    "attn",
                    int(name),
                    attn.kv_heads,
                    (
                        UnitSlice(f"{a}.q_proj.weight", f"{a}.q_proj", dim=0, unit_size=attn.group * head_dim),
                        UnitSlice(f"{a}.k_proj.weight", f"{a}.k_proj", dim=0, unit_size=head_dim),
                        UnitSlice(f"{a}.v_proj.weight", f"{a}.v_proj", dim=0, unit_size=head_dim, gate_part=0),
                        UnitSlice(f"{a}.o_proj.weight", f"{a}.o_proj", dim=1, unit_size=attn.group * head_dim),
                    ),
                    out_module=f"{a}.o_proj",
                )
            )
            groups.append(
                UnitGroup(
                    "mlp",
                    int(name),
                    layer.mlp.up_proj.out_features,
                    (
                        UnitSlice(f"{m}.gate_proj.weight", f"{m}.gate_proj", dim=0, unit_size=1, gate_part=0),
                        UnitSlice(f"{m}.up_proj.weight", f"{m}.up_proj", dim=0, unit_size=1, gate_part=0),
                        UnitSlice(f"{m}.down_proj.weight", f"{m}.down_proj", dim=1, unit_size=1),
                    ),
                    out_module=f"{m}.down_proj",
                )
            )
        return groups

    def thinned_config(self, model: GatedLM, widths: dict[tuple[str, int], int]) -> GatedLMConfig:
        n = model.cfg.n_layer
        return dataclasses.replace(
            model.cfg,
            kv_heads_per_layer=[widths["attn", i] for i in range(n)],
            mlp_per_layer=[widths["mlp", i] for i in range(n)],
        )


register(GatedFamily())
