"""A nanoGPT-style decoder: pre-LayerNorm blocks, causal SDPA attention, GELU MLP, tied embeddings.

Module names are part of the public contract (compression targets and pipeline split points):
``tok_emb``, ``pos_emb``, ``blocks.<i>.{ln1, attn.qkv, attn.proj, ln2, mlp.fc, mlp.proj}``,
``ln_f`` and ``head`` (whose weight is ``tok_emb.weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_dim: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = n_head, head_dim, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_head * head_dim, bias=bias)
        self.proj = nn.Linear(n_head * head_dim, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only LM. ``forward(idx, hidden_layers=...)`` returns logits, and hidden states if asked.

    Hidden state ``i`` is the residual stream after block ``i - 1`` (0 = the embeddings,
    ``n_layer`` = the output of the last block, before ``ln_f``).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head and cfg.head_dim is None:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
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

    @property
    def width(self) -> int:
        return self.cfg.n_embd

    def forward(self, idx: torch.Tensor, hidden_layers: tuple[int, ...] = ()):
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        hidden = {0: x} if 0 in hidden_layers else {}
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in hidden_layers:
                hidden[i] = x
        logits = self.head(self.ln_f(x))
        return (logits, hidden) if hidden_layers else logits
