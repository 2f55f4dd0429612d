"""Distillation across tokenizers: a teacher whose vocabulary is not the student's.

The student's token ids are decoded to their text; the teacher tokenizes that text itself. A student position and a
teacher position are *aligned* where both tokenizations end at the same character: from there both models predict
the text that follows, each in its own tokens.

- ``span`` compares the two next-token distributions on the tokens both vocabularies have (the same decoded text,
  ``SharedVocab``), with the probability of every other token kept as one tail bucket on each side, so nothing is
  renormalised away (in the manner of GOLD, DSKD and MinED);
- ``uld`` (Boizard et al. 2024, Universal Logit Distillation) compares the two distributions sorted, tokenizer-free:
  the sum of |p_s - p_t| over ranks, the shorter vector padded with zeros.

Between two identical tokenizers every position aligns and every token is shared, so ``span`` is ``exact`` KD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.distill.divergence import TAIL_FLOOR, lookup, teacher_buckets

ANCHOR_TEXT = "a"  # a token decoded before another shows the other's leading space (SentencePiece drops it alone)
UNREADABLE = "\ufffd"  # what a token of part of a character decodes to alone


def token_keys(tokenizer: Any, strings: Sequence[str]) -> list[str]:
    """What a token is matched by across vocabularies: its text; for a token without one (part of a character, a
    special token that reads as nothing), its own name in the vocabulary (byte-level BPEs name bytes alike)."""
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [text if text else f"\0{name}" for text, name in zip(strings, names, strict=True)]


def token_strings(tokenizer: Any) -> list[str]:
    """Each id's text as it reads after another token (so a SentencePiece word keeps its leading space); ``""`` for a
    token that is part of a character (byte-level BPE) or reads as nothing."""
    anchor = tokenizer.encode(ANCHOR_TEXT, add_special_tokens=False)[:1]
    prefix = len(tokenizer.decode(anchor, clean_up_tokenization_spaces=False))
    strings = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([*anchor, token], clean_up_tokenization_spaces=False)[prefix:]
        strings.append("" if UNREADABLE in text else text)
    return strings


@dataclass(frozen=True)
class SharedVocab:
    """The tokens both vocabularies have: ``student[i]`` and ``teacher[i]`` decode to the same text."""

    student: Tensor  # long [S]
    teacher: Tensor  # long [S]
    student_vocab: int  # the tokenizers' sizes: a model's logits past them are padding, left out
    teacher_vocab: int

    @classmethod
    def of(cls, student_keys: Sequence[str], teacher_keys: Sequence[str]) -> SharedVocab:
        """Pairs of ids whose keys (``token_keys``) are equal; where a key has several ids, its first on each side."""
        teacher_by_key: dict[str, int] = {}
        for token, key in enumerate(teacher_keys):
            teacher_by_key.setdefault(key, token)
        pairs, seen = [], set()
        for token, key in enumerate(student_keys):
            if key and key in teacher_by_key and key not in seen:
                seen.add(key)
                pairs.append((token, teacher_by_key[key]))
        student, teacher = zip(*pairs, strict=True) if pairs else ((), ())
        student_ids, teacher_ids = (torch.tensor(side, dtype=torch.long) for side in (student, teacher))
        return cls(student_ids, teacher_ids, len(student_keys), len(teacher_keys))


def char_ends(tokenizer: Any, ids: Sequence[int], strings: Sequence[str]) -> tuple[str, list[int]]:
    """The text ``ids`` decode to and where in it each token ends: from the tokens' own texts where they add up to
    it, else (a character split across tokens) by decoding each prefix."""
    text = tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
    ends, at = [], 0
    for token in ids:
        at += len(strings[token])
        ends.append(at)
    if "".join(strings[token] for token in ids) == text:
        return text, ends
    prefixes = [tokenizer.decode(list(ids[: i + 1]), clean_up_tokenization_spaces=False) for i in range(len(ids))]
    return text, [len(prefix) for prefix in prefixes]


def aligned_pairs(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[tuple[int, int]]:
    """(student position, teacher position) where both tokenizations end at the same character (the teacher's last
    such position where several end there)."""
    teacher_at = {end: position for position, end in enumerate(teacher_ends)}
    return [(i, teacher_at[end]) for i, end in enumerate(student_ends) if end in teacher_at]


@dataclass
class Alignment:
    """A batch as the teacher reads it: its token ids (rows right-padded to the longest) and the aligned positions
    as flat indices into the student's ``[B * T]`` and the teacher's ``[B * T_t]`` positions; per row, where each
    student token ends in the row's text and each teacher token's (start, end) there."""

    teacher_ids: Tensor  # long [B, T_t]
    student_rows: Tensor  # long [N]
    teacher_rows: Tensor  # long [N]
    student_ends: list[list[int]] = field(default_factory=list)
    teacher_spans: list[list[tuple[int, int]]] = field(default_factory=list)


class Aligner:
    """Turns the student's batches into the teacher's tokens and the aligned positions."""

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any):
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_strings = token_strings(student_tokenizer)
        teacher_keys = token_keys(teacher_tokenizer, token_strings(teacher_tokenizer))
        self.shared = SharedVocab.of(token_keys(student_tokenizer, self.student_strings), teacher_keys)
        self.pad = teacher_tokenizer.eos_token_id

    def __call__(self, x: Tensor) -> Alignment:
        rows, student_rows, teacher_rows, all_ends, all_spans = [], [], [], [], []
        for ids in x.tolist():
            text, student_ends = char_ends(self.student_tokenizer, ids, self.student_strings)
            encoded = self.teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            rows.append(encoded["input_ids"])
            pairs = aligned_pairs(student_ends, [end for _, end in encoded["offset_mapping"]])
            student_rows.append([i for i, _ in pairs])
            teacher_rows.append([j for _, j in pairs])
            all_ends.append(student_ends)
            all_spans.append([(start, end) for start, end in encoded["offset_mapping"]])
        width = max(1, max(len(row) for row in rows))
        teacher_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        for b, row in enumerate(rows):
            teacher_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        s_flat = [b * x.shape[1] + i for b, row in enumerate(student_rows) for i in row]
        t_flat = [b * width + j for b, row in enumerate(teacher_rows) for j in row]
        s_index, t_index = (torch.tensor(flat, dtype=torch.long, device=x.device) for flat in (s_flat, t_flat))
        return Alignment(teacher_ids.to(x.device), s_index, t_index, all_ends, all_spans)


def text_logprob(aligned: AlignedLogits, chars: Sequence[tuple[int, int] | None]) -> Tensor:
    """The teacher's log-probability (temperature 1) of its own tokens that lie wholly in each row's characters
    ``[begin, end)`` (None: none), summed over the rows: how likely it finds that text, in its tokens."""
    a = aligned.alignment
    total = aligned.logits.new_zeros((), dtype=torch.float32)
    for row, span in enumerate(chars):
        if span is None:
            continue
        begin, end = span
        inside = [j for j, (start, stop) in enumerate(a.teacher_spans[row]) if j > 0 and start >= begin and stop <= end]
        if not inside:
            continue
        at = torch.tensor(inside, device=aligned.logits.device)
        logits = aligned.logits[row, at - 1, : aligned.shared.teacher_vocab].float()  # position j - 1 predicts j
        total = total + F.log_softmax(logits, dim=-1).gather(-1, a.teacher_ids[row, at, None]).sum()
    return total


def shared_buckets(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """``logits [N, V]`` at the shared ``ids`` and one bucket of the rest of the mass at ``temperature``: ``[N, S + 1]``
    logits whose softmax at ``temperature`` is the probabilities of the shared tokens and of all the others."""
    logits = logits.float()
    rest = logits.index_fill(-1, ids, -torch.inf)
    tail = temperature * torch.logsumexp(rest / temperature, dim=-1, keepdim=True)
    return torch.cat([logits.index_select(-1, ids), tail.clamp_min(TAIL_FLOOR)], dim=-1)


def uld(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per position: the sum over ranks of |p_s - p_t|, each distribution sorted, the shorter padded with zeros."""
    p_s = F.softmax(student.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = F.softmax(teacher.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s, p_t = F.pad(p_s, (0, width - p_s.shape[-1])), F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1)


@dataclass
class AlignedLogits:
    """A teacher's output across tokenizers: its logits ``[B, T_t, V_t]`` of the batch as it reads it, the aligned
    positions, the shared tokens and how the two distributions are compared (``span`` or ``uld``)."""

    logits: Tensor
    alignment: Alignment
    shared: SharedVocab
    how: str


@dataclass
class AlignedLoss:
    """The KD term over aligned positions and what the alignment kept."""

    kd: Tensor  # scalar: mean over the aligned positions whose label counts, times T**2
    aligned_fraction: Tensor  # aligned positions / the student's positions whose label counts
    shared_mass: Tensor  # the teacher's mean probability (T = 1) on the shared tokens at the aligned positions


def aligned_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alignment: Alignment,
    shared: SharedVocab,
    labels: Tensor,
    *,
    how: str,
    kind: str,
    temperature: float,
    beta: float,
    ignore_index: int = -100,
) -> AlignedLoss:
    """KD between the student's ``[B, T, V_s]`` and the teacher's ``[B, T_t, V_t]`` logits at the aligned positions
    whose label is not ``ignore_index``: ``span`` (divergence ``kind`` over the shared tokens and a tail bucket) or
    ``uld``."""
    counted = labels.reshape(-1) != ignore_index
    keep = counted.index_select(0, alignment.student_rows) if alignment.student_rows.numel() else counted[:0]
    s_rows = alignment.student_rows[keep]
    t_rows = alignment.teacher_rows[keep]
    student = student_logits[..., : shared.student_vocab].flatten(0, -2).index_select(0, s_rows)
    teacher = teacher_logits[..., : shared.teacher_vocab].flatten(0, -2).index_select(0, t_rows).detach()
    zero = student_logits.new_zeros((), dtype=torch.float32)
    fraction = s_rows.numel() / max(int(counted.sum()), 1) + zero
    if s_rows.numel() == 0:
        return AlignedLoss(student_logits.float().sum() * 0.0, fraction, zero)
    on_shared = F.softmax(teacher.float(), dim=-1).index_select(-1, shared.teacher.to(teacher.device)).sum(-1)
    if how == "uld":
        per_token = uld(student, teacher, temperature)
    else:
        s_buckets = shared_buckets(student, shared.student.to(student.device), temperature)
        t_buckets = shared_buckets(teacher, shared.teacher.to(teacher.device), temperature)
        logp_s = F.log_softmax(s_buckets / temperature, dim=-1)
        logp_t = F.log_softmax(t_buckets / temperature, dim=-1)
        per_token = lookup(kind)(logp_s, logp_t, beta)
    return AlignedLoss(per_token.mean() * temperature**2, fraction, on_shared.mean().detach())


@dataclass
class AlignedTopK:
    """A cached teacher across tokenizers (a cache kept by document): at the student's aligned positions (flat
    indices into its ``[B * T]``), the teacher's top-k raw logits, their ids in the student's vocabulary (-1 for a
    token it lacks) and the log-sum-exp of the teacher's whole row at the cache's temperature."""

    student_rows: Tensor  # long [N]
    values: Tensor  # [N, k]
    student_ids: Tensor  # long [N, k]
    lse: Tensor  # [N]
    student_vocab: int


def topk_span_kd(
    student_logits: Tensor,
    teacher: AlignedTopK,
    labels: Tensor,
    *,
    kind: str,
    temperature: float,
    beta: float,
    ignore_index: int = -100,
) -> AlignedLoss:
    """``span`` KD against a cached top-k: at each aligned position the buckets are the teacher's top-k tokens the
    student's vocabulary has, and one tail holding the rest of each side's mass (the teacher's tokens off its top-k
    or not shared; the student's other tokens). With every token shared and k the whole vocabulary, this is KD on the
    full distributions. ``shared_mass``: the teacher's probability on those tokens, at the cache's temperature."""
    counted = labels.reshape(-1) != ignore_index
    keep = counted.index_select(0, teacher.student_rows) if teacher.student_rows.numel() else counted[:0]
    rows = teacher.student_rows[keep]
    zero = student_logits.new_zeros((), dtype=torch.float32)
    fraction = rows.numel() / max(int(counted.sum()), 1) + zero
    if rows.numel() == 0:
        return AlignedLoss(student_logits.float().sum() * 0.0, fraction, zero)
    values, ids, lse = teacher.values[keep].float(), teacher.student_ids[keep], teacher.lse[keep].float()
    student = student_logits[..., : teacher.student_vocab].flatten(0, -2).index_select(0, rows).float()
    shared, picked = ids >= 0, ids.clamp_min(0)
    t_buckets = teacher_buckets(values.masked_fill(~shared, -torch.inf), lse, temperature).clamp_min(TAIL_FLOOR)
    taken = torch.zeros_like(student, dtype=torch.int32).scatter_add_(-1, picked, shared.int())
    rest = temperature * torch.logsumexp(student.masked_fill(taken > 0, -torch.inf) / temperature, -1, keepdim=True)
    s_buckets = torch.cat([student.gather(-1, picked).masked_fill(~shared, TAIL_FLOOR), rest.clamp_min(TAIL_FLOOR)], -1)
    logp_s = F.log_softmax(s_buckets / temperature, dim=-1)
    logp_t = F.log_softmax(t_buckets / temperature, dim=-1)
    per_token = lookup(kind)(logp_s, logp_t, beta)
    on_shared = (values / temperature - lse.unsqueeze(-1)).exp().masked_fill(~shared, 0.0).sum(-1)
    return AlignedLoss(per_token.mean() * temperature**2, fraction, on_shared.mean().detach())
