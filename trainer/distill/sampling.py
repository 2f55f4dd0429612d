"""What the student writes in on-policy distillation (``trainer/distill/on_policy.py``): which rows of a step's
global batch (``on_policy_rows``, seeded from (seed, step) so every rank and world size agrees), where each row's
prompt ends, and the completions themselves (``generate``: one seeded generator per sample, so 1 and N ranks and a
resumed run write the same tokens)."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from trainer.data import IGNORE_INDEX
from trainer.models.protocol import KVCache, family_of


def sample_seed(seed: int, step: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` of step ``step``'s global batch (index -1: the step's choice of rows)."""
    digest = hashlib.sha256(f"stillroom/on_policy/{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def on_policy_rows(seed: int, step: int, batch_size: int, lmbda: float) -> torch.Tensor:
    """Which rows of step ``step``'s global batch the student completes: ``round(lmbda * batch_size)`` of them,
    chosen by a permutation seeded from (seed, step) (bool ``[batch_size]``)."""
    count = math.floor(lmbda * batch_size + 0.5)
    order = torch.randperm(batch_size, generator=torch.Generator().manual_seed(sample_seed(seed, step, -1)))
    rows = torch.zeros(batch_size, dtype=torch.bool)
    rows[order[:count]] = True
    return rows


def prompt_lengths(x: torch.Tensor, y: torch.Tensor, masked: bool, prompt_tokens: int) -> torch.Tensor:
    """Each row's prompt length: ``prompt_tokens``, or with masked labels (chat) the position where the last
    trained run of labels (the last assistant turn) starts."""
    if not masked:
        return torch.full((x.shape[0],), prompt_tokens, dtype=torch.long)
    trained = (y != IGNORE_INDEX).cpu()
    lengths = []
    for row in trained:
        positions = row.nonzero().flatten().tolist()
        if not positions:  # no trained token (not produced by the data sets): the whole row is the prompt
            lengths.append(row.numel())
            continue
        first = positions[-1]
        while first > 0 and bool(row[first - 1]):
            first -= 1
        lengths.append(first + 1)  # label t is token t + 1: the turn's first token sits at first + 1
    return torch.tensor(lengths, dtype=torch.long)


def sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``logits`` ``[rows, V]``, by inverse CDF of ``uniforms`` ``[rows]`` in [0, 1), computed
    in float64: greedy at temperature 0; else ``softmax(logits / temperature)`` restricted to its top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True, stable=True)
    if top_p < 1:
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each: keep while under top_p
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1]).unsqueeze(-1), right=True)
    return order.gather(-1, picked.clamp_max(probs.shape[-1] - 1)).squeeze(-1)


@dataclass
class Completions:
    """What the student wrote for the on-policy rows: ``tokens`` ``[rows, T + 1]`` (prompt, completion, padding),
    the prompt and completion lengths, whether each ended with the end-of-text token, seconds spent."""

    tokens: torch.Tensor
    prompts: torch.Tensor
    lengths: torch.Tensor
    eos: torch.Tensor
    seconds: float


@torch.no_grad()
def generate(
    model: nn.Module,
    rows: torch.Tensor,
    prompts: torch.Tensor,
    generators: list[torch.Generator],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos: int | None,
    pad: int,
    vocab: int | None = None,
    span: tuple[int, int] | None = None,
) -> Completions:
    """Complete ``rows`` ``[n, T + 1]`` (their first ``prompts[i]`` tokens are row i's prompt) with up to
    ``max_new_tokens`` tokens each (and within the row), all rows at once: the shortest prompt is read in one
    forward, then one position per forward (with a key/value cache where ``model``'s family has one); a row still
    in its prompt keeps its own token. Row ``i`` samples with ``generators[i]``, one uniform per token it samples.
    A row stops after ``eos``; the positions after a row's end hold ``pad``. ``vocab``: sample only among the
    first ``vocab`` tokens (the real vocabulary). ``span``: the positions (first, last) the forwards run over, in
    place of this batch's own (ranks of a sharded student run the same number of forwards: each is a collective).
    ``model`` runs in eval mode and is put back as it was."""
    start_time = time.perf_counter()
    tokens = rows.clone()
    n, width = tokens.shape
    device = tokens.device
    prompts = prompts.to(device)
    ends = torch.minimum(prompts + max_new_tokens, torch.full_like(prompts, width))
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    ended = torch.zeros(n, dtype=torch.bool, device=device)
    first, last = span if span is not None else (int(prompts.min()), int(ends.max()))
    cache = KVCache() if family_of(model).kv_cache else None
    was_training = model.training
    model.eval()
    try:
        logits = model(tokens[:, :first], cache=cache) if cache is not None else model(tokens[:, :first])
        for position in range(first, last):
            writing = (position >= prompts) & (position < ends) & ~ended
            if bool(writing.any()):
                chosen = writing.nonzero().flatten().tolist()
                uniforms = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in chosen])
                uniforms = uniforms.to(device)
                scores = logits[chosen, -1].float()
                scores = scores[:, :vocab] if vocab is not None else scores
                tokens[chosen, position] = sample(scores, uniforms, temperature, top_p).to(tokens.dtype)
                lengths += writing
                if eos is not None:
                    ended |= writing & (tokens[:, position] == eos)
            tokens[(position >= prompts) & ~writing, position] = pad  # after a row's end
            if position + 1 < last:
                if cache is not None:
                    logits = model(tokens[:, position : position + 1], cache=cache)
                else:
                    logits = model(tokens[:, : position + 1])
        tokens[:, last:] = pad  # every prompt ends before ``last``
    finally:
        model.train(was_training)
    return Completions(tokens, prompts, lengths, ended, time.perf_counter() - start_time)
