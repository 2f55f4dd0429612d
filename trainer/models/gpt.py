"""A nanoGPT-style decoder: pre-LayerNorm blocks, causal SDPA attention, GELU MLP, tied embeddings.

Module names are part of the public contract (compression targets and pipeline split points):
``tok_emb``, ``pos_emb``, ``blocks.<i>.{ln1, attn.qkv, attn.proj, ln2, mlp.fc, mlp.proj}``,
``ln_f`` and ``head`` (whose weight is ``tok_emb.weight``). ``GPTFamily`` is the only other code
that knows them (see ``trainer/models/protocol.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.protocol import (
    FINAL_HIDDEN,
    ConfigFieldError,
    HeadFn,
    KVCache,
    ModelFamily,
    UnitGroup,
    UnitSlice,
    register,
)


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    # Widths after structured pruning; None means the dense default (4 * n_embd, n_embd // n_head).
    mlp_hidden: list[int] | None = None
    head_dim: int | None = None
    n_heads_per_layer: list[int] | None = None

    def __post_init__(self) -> None:
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ConfigFieldError(key, f"must be >= 1 (got {getattr(self, key)})")
        if self.n_embd % self.n_head and self.head_dim is None:
            raise ConfigFieldError("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ConfigFieldError("dropout", f"must be in [0, 1) (got {self.dropout})")


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_dim: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = n_head, head_dim, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_head * head_dim, bias=bias)
        self.proj = nn.Linear(n_head * head_dim, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(k, v, layer)
        # Without cached positions (or one new position attending to all of them) a causal flag is the whole mask.
        mask = None if past == 0 or T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        head_dim = cfg.head_dim or cfg.n_embd // cfg.n_head
        n_head = cfg.n_heads_per_layer[layer] if cfg.n_heads_per_layer else cfg.n_head
        hidden = cfg.mlp_hidden[layer] if cfg.mlp_hidden else 4 * cfg.n_embd
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.n_embd, n_head, head_dim, cfg.dropout, cfg.bias)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg.n_embd, hidden, cfg.dropout, cfg.bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only LM. ``forward(idx, hidden_layers=...)`` returns logits, and hidden states if asked.

    Hidden state ``i`` is the residual stream after block ``i - 1`` (0 = the embeddings,
    ``n_layer`` = the output of the last block, before ``ln_f``).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        hidden_layers: tuple[int, ...] = (),
        head: HeadFn | None = None,
        cache: KVCache | None = None,
    ):
        """Logits of token ids ``idx`` (and hidden states, see the class). In a pipeline stage (``GPTFamily``
        deletes what it does not own) a float input is the previous stage's output, and a stage without
        ``head`` returns its last block's output. With ``cache`` (incremental decoding), ``idx`` are the positions
        after the cached ones."""
        past = 0 if cache is None else cache.length
        if idx.is_floating_point():
            x = idx
        else:
            T = idx.shape[1]
            if past + T > self.cfg.block_size:
                raise ValueError(f"sequence length {past + T} exceeds block_size {self.cfg.block_size}")
            pos = torch.arange(past, past + T, device=idx.device)
            x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        hidden = {0: x} if 0 in hidden_layers else {}
        for name, block in self.blocks.items():
            x = block(x) if cache is None else block(x, cache, int(name))
            if int(name) + 1 in hidden_layers:
                hidden[int(name) + 1] = x
        if cache is not None:
            cache.length += x.shape[1]
        if self.head is None:
            return x
        x = self.ln_f(x)
        if FINAL_HIDDEN in hidden_layers:
            hidden[FINAL_HIDDEN] = x
        logits = self.head(x) if head is None else head(x, self.head.weight, self.head.bias)
        return (logits, hidden) if hidden_layers else logits


class GPTFamily(ModelFamily[GPT]):
    """Stillroom's GPT through the model protocol."""

    name, model_class, config_class, layers_attr = "gpt", GPT, GPTConfig, "blocks"
    structured_units = pipelines = fused_head = kv_cache = True

    def build(self, config: GPTConfig) -> GPT:
        return GPT(config)

    def config(self, model: GPT) -> GPTConfig:
        return model.cfg

    def depth(self, config: GPTConfig) -> int:
        return config.n_layer

    def layers(self, model: GPT) -> dict[str, nn.Module]:
        return dict(model.blocks.items())

    def width(self, model: GPT) -> int:
        return model.cfg.n_embd

    def vocab_size(self, model: GPT) -> int:
        return model.cfg.vocab_size

    def embeddings(self, model: GPT) -> list[str]:
        return ["tok_emb", "pos_emb", "drop"]

    def outputs(self, model: GPT) -> list[str]:
        return ["ln_f", "head"]

    def head(self, model: GPT) -> nn.Module:
        return model.head

    def tied_weights(self, model: GPT) -> list[str]:
        return ["tok_emb.weight"]

    def unit_groups(self, model: GPT) -> list[UnitGroup]:
        """Per block: the MLP's hidden units (``fc`` rows, ``proj`` columns) and the attention heads (q, k and v
        rows of the fused ``qkv``, ``proj`` columns); a head whose v rows are masked outputs zero, and so
        does an MLP unit whose ``fc`` row is (GELU(0) = 0)."""
        groups = []
        for name, module in model.blocks.items():
            block = cast(Block, module)  # nn.ModuleDict's items are typed as plain modules
            mlp, attn = f"blocks.{name}.mlp", f"blocks.{name}.attn"
            hidden = block.mlp.fc.out_features
            groups.append(
                UnitGroup(
                    "mlp",
                    int(name),
                    hidden,
                    (
                        *self._in_slices(f"{mlp}.fc", block.mlp.fc, unit_size=1, parts=1, gate_part=0),
                        UnitSlice(f"{mlp}.proj.weight", f"{mlp}.proj", dim=1, unit_size=1),
                    ),
                    out_module=f"{mlp}.proj",
                )
            )
            head_dim = block.attn.head_dim
            groups.append(
                UnitGroup(
                    "attn",
                    int(name),
                    block.attn.n_head,
                    (
                        *self._in_slices(f"{attn}.qkv", block.attn.qkv, unit_size=head_dim, parts=3, gate_part=2),
                        UnitSlice(f"{attn}.proj.weight", f"{attn}.proj", dim=1, unit_size=head_dim),
                    ),
                    out_module=f"{attn}.proj",
                )
            )
        return groups

    @staticmethod
    def _in_slices(module: str, linear: nn.Linear, **shape) -> tuple[UnitSlice, ...]:
        params = ["weight"] + (["bias"] if linear.bias is not None else [])
        return tuple(UnitSlice(f"{module}.{p}", module, dim=0, **shape) for p in params)

    def thinned_config(self, model: GPT, widths: dict[tuple[str, int], int]) -> GPTConfig:
        cfg, n = model.cfg, model.cfg.n_layer
        return dataclasses.replace(
            cfg,
            mlp_hidden=[widths["mlp", i] for i in range(n)],
            n_heads_per_layer=[widths["attn", i] for i in range(n)],
            head_dim=cast(Block, model.blocks["0"]).attn.head_dim,
        )

    def hidden_dims(self, model: GPT) -> dict[str, int]:
        """The embeddings' and head's columns, the norms' weights and biases, the projections' input or output
        features."""
        by_suffix = {"tok_emb.weight": 1, "pos_emb.weight": 1, "head.weight": 1, "qkv.weight": 1, "fc.weight": 1}
        by_suffix |= dict.fromkeys(("proj.weight", "proj.bias"), 0)
        dims = {}
        for name in model.state_dict():
            suffix = ".".join(name.split(".")[-2:])
            if suffix in by_suffix:
                dims[name] = by_suffix[suffix]
            elif suffix.split(".")[0] in ("ln1", "ln2", "ln_f"):
                dims[name] = 0
        return dims

    def cut_config(self, model: GPT, layers: list[int], widths: dict[tuple[str, int], int], hidden: int) -> GPTConfig:
        n = len(layers)
        return dataclasses.replace(
            model.cfg,
            n_layer=n,
            n_embd=hidden,
            mlp_hidden=[widths["mlp", i] for i in range(n)],
            n_heads_per_layer=[widths["attn", i] for i in range(n)],
            head_dim=cast(Block, model.blocks["0"]).attn.head_dim,
        )


register(GPTFamily())
