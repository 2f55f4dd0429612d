"""On-policy distillation (GKD, Agarwal et al. 2024): for a fraction ``distill.lmbda`` of each step's samples the
student writes a completion of the sample's prompt, and the teacher grades every token of it.

- **Which samples**: ``on_policy_rows`` chooses ``round(lmbda * batch_size)`` rows of the step's global batch by a
  permutation seeded from (seed, step), so every rank and every world size agrees on them.
- **The prompt**: ``data=chat``: the conversation up to its last assistant turn (the labels say where that turn
  starts); other language-model data: the first ``distill.prompt_tokens`` tokens of the window.
- **Sampling**: the student (in eval mode, no gradient, in the run's autocast) decodes the micro-batch's prompts
  together with a key/value cache (``trainer.models.protocol.KVCache``; a family without one recomputes the whole
  prefix per token), at ``distill.gen_temperature`` (0: greedy) with optional nucleus ``distill.top_p``, up to
  ``distill.max_new_tokens`` tokens or the data's end-of-text token. Sample ``i`` of step ``s`` draws its
  uniforms from its own ``torch.Generator`` seeded from (seed, s, i) (``sample_seed``), one per token it samples:
  1 and N ranks, and a resumed run, write the same completions.
- **The rows trained**: an on-policy row becomes prompt + completion (padded after its end); its labels are the
  completion's tokens (``y_on``), everything else ``IGNORE_INDEX``; the off-policy rows keep theirs (``y_off``).
  One student forward and one teacher call cover both; the loss is ``w_off * L_off + w_on * L_on``, with ``L_off``
  today's ``(1 - alpha) * CE + alpha * KD`` over the off-policy rows' labels, ``L_on`` the same divergence kind
  (``distill.loss``, reverse KL by default) over the completion tokens only, and ``w`` the rows' shares of the
  global batch. Each part is a mean over the **global batch's** tokens of that part (every micro-batch of every
  rank), as the chat data's losses are (``Batches.loss_scale``): completions end at different lengths, and a mean of
  the ranks' means would weigh a short completion's tokens more, so 1 and N ranks would differ. Nothing flows
  through the sampling itself.
- **The step's samples first**: at a step's first micro-batch the student writes the completions of every
  micro-batch of the step on this rank (the weights change only after the step's last micro-batch) and the ranks
  add up each part's token count (one all-reduce), which the losses are normalised by.
- **A teacher on ranks of its own** (``Teacher.scores_apart``): the samples are sent as soon as they exist
  (``Teacher.send_samples``), so while the teacher ranks score one micro-batch's the student writes the next's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.data import IGNORE_INDEX, Batches, local_slice
from trainer.distill.align import Alignment, text_logprob
from trainer.distill.fused import fused_logit_losses
from trainer.distill.losses import logit_losses
from trainer.distill.sampling import Completions, generate, on_policy_rows, prompt_lengths, sample_seed

if TYPE_CHECKING:
    from trainer.config import DistillConfig
    from trainer.distill.interface import Teacher, TeacherOutput

ALIGNMENT_KEYS = ("distill/aligned_fraction", "distill/shared_mass")
NO_ROWS = 1 << 30  # the first position a rank without rows to complete offers (``OnPolicy.agree``)

# The statistics each micro-batch adds up (summed over micro-batches and ranks, then turned into metrics).
STATS = (
    "on_kl_sum",  # the on-policy divergence summed over completion tokens
    "teacher_logprob_sum",  # the teacher's log-probability of the student's tokens, summed
    "tokens",  # completion tokens
    "rows",  # on-policy rows
    "eos",  # on-policy rows that ended with the end-of-text token
    "seconds",  # time spent generating
)


@dataclass
class Rollout:
    """A micro-batch after generation: inputs ``x`` (on-policy rows replaced by prompt + completion), the labels of
    the off-policy part ``y_off`` and of the on-policy part ``y_on`` (``IGNORE_INDEX`` elsewhere), which rows are
    on-policy (``on``, bool ``[rows]``), and the completions (None without on-policy rows).

    ``shares``: the off- and on-policy rows' shares of the global batch (default: of this micro-batch). ``scales``:
    for each part, the factor that turns this micro-batch's mean over its own tokens of the part into its share of
    the mean over the global batch's (``local tokens / global tokens x ranks x micro-batches``: gradients are
    averaged over both; default 1, the micro-batch being the whole batch)."""

    x: torch.Tensor
    y_off: torch.Tensor
    y_on: torch.Tensor
    on: torch.Tensor
    completions: Completions | None
    shares: tuple[float, float] | None = None
    scales: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if self.shares is None:
            on = int(self.on.sum()) / self.on.numel()
            self.shares = (1 - on, on)

    def token_counts(self) -> tuple[int, int]:
        """The tokens this micro-batch trains of the off- and of the on-policy part."""
        return int((self.y_off != IGNORE_INDEX).sum()), int((self.y_on != IGNORE_INDEX).sum())

    @property
    def start(self) -> int:
        """The first position whose label is a completion token (the teacher need not score those before it)."""
        return 0 if self.completions is None else int(self.completions.prompts.min()) - 1


def completion_labels(c: Completions) -> torch.Tensor:
    """Labels of the completions' rows ``[rows, T]``: the completion tokens where they are predicted (position
    t predicts token t + 1), ``IGNORE_INDEX`` elsewhere."""
    n, width = c.tokens.shape
    targets = torch.arange(1, width, device=c.tokens.device)
    written = (targets >= c.prompts[:, None]) & (targets < (c.prompts + c.lengths)[:, None])
    return torch.where(written, c.tokens[:, 1:], IGNORE_INDEX)


def teacher_logprob_sum(t_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probabilities (at temperature 1) of ``tokens`` ``[n]`` from its logits ``[n, V]``, summed."""
    return F.log_softmax(t_logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).sum()


def summarize(stats: torch.Tensor, ranks: int) -> dict[str, torch.Tensor]:
    """The metrics of ``STATS`` summed over a step's micro-batches and ``ranks`` ranks."""
    s = dict(zip(STATS, stats.double().unbind()))
    tokens, rows = s["tokens"].clamp_min(1), s["rows"].clamp_min(1)
    return {
        "distill/on_policy_kl": s["on_kl_sum"] / tokens,
        "distill/teacher_logprob": s["teacher_logprob_sum"] / tokens,
        "gen/tokens_per_s": s["tokens"] / (s["seconds"] / ranks).clamp_min(1e-9),
        "gen/mean_length": s["tokens"] / rows,
        "gen/eos_fraction": s["eos"] / rows,
    }


def completion_chars(y_on: torch.Tensor, alignment: Alignment) -> list[tuple[int, int] | None]:
    """Each row's completion as characters ``[begin, end)`` of its text (None: a row without one): from where the
    token before the completion ends to where its last token in the row ends (the last token of a completion that
    fills the row is only a label: not in the text the teacher read)."""
    chars: list[tuple[int, int] | None] = []
    for row, labels in enumerate(y_on.tolist()):
        kept = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        ends = alignment.student_ends[row]
        chars.append((ends[kept[0]], ends[min(kept[-1] + 1, len(ends) - 1)]) if kept else None)
    return chars


def teacher_logits_at(teacher: TeacherOutput, kept: torch.Tensor) -> torch.Tensor:
    """The teacher's logits at the ``kept`` positions ``[rows, T]`` only (from its head where it gives that)."""
    if teacher.head is not None:
        hidden, weight, bias = teacher.head
        return F.linear(hidden[kept], weight, bias)
    assert teacher.logits is not None  # on-policy teachers are live or remote (preflight: no cache)
    return teacher.logits[kept]


def mixed(off: dict[str, torch.Tensor] | None, on: dict[str, torch.Tensor] | None, rollout: Rollout, zero):
    """``train/loss`` = the off- and on-policy parts, each rescaled to its share of the global batch's mean
    (``rollout.scales``), weighted by their rows' shares; ``train/ce`` and ``distill/kd`` are the off-policy part's
    rescaled likewise (0 without off-policy tokens here), ``distill/on_policy`` this micro-batch's own mean of the
    on-policy divergence (the step's value is a mean over its tokens: ``OnPolicy.stats``); with a teacher of another
    tokenizer, what the alignment kept over the completions (over the off-policy rows where none is here)."""
    assert rollout.shares is not None  # set on creation
    (w_off, w_on), (s_off, s_on) = rollout.shares, rollout.scales
    loss = zero
    if off is not None:
        loss = loss + w_off * s_off * off["train/loss"]
    if on is not None:
        loss = loss + w_on * s_on * on["train/loss"]  # alpha = 1: the divergence alone, with its gradient
    out = {
        "train/ce": s_off * off["train/ce"] if off is not None else zero,
        "distill/kd": s_off * off["distill/kd"] if off is not None else zero,
        "train/loss": loss,
        "distill/on_policy": on["distill/kd"].detach() if on is not None else zero,
    }
    for key in ALIGNMENT_KEYS:  # a teacher of another tokenizer: what the alignment kept, of the completions first
        part = on if on is not None and key in on else off
        if part is not None and key in part:
            out[key] = part[key]
    return out


def fused_mixed_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rollout: Rollout,
    teacher: TeacherOutput,
    d: DistillConfig,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """``mixed`` through the fused head + divergence: a model's ``head=`` function (two fused passes, each over its
    own labels; the logits soft-capped at ``softcap``, if any)."""
    n_off, n_on = rollout.token_counts()
    off = fused_logit_losses(hidden, weight, bias, rollout.y_off, teacher, d, softcap) if n_off else None
    on_d = dataclasses.replace(d, alpha=1.0)  # the completions: the divergence alone
    on = fused_logit_losses(hidden, weight, bias, rollout.y_on, teacher, on_d, softcap) if n_on else None
    return mixed(off, on, rollout, hidden.new_zeros((), dtype=torch.float32))


class OnPolicy:
    """The on-policy part of a run on this rank: which rows of each micro-batch the student completes, the
    completions, the mixed loss, and the statistics of the step (``STATS``, summed over micro-batches).

    ``total(counts)``: ``counts`` summed over the data-parallel ranks (None: one rank).
    ``agree(first, last)``: where the student's forward is a collective (FSDP2), the span of positions every rank's
    generation runs over (the smallest first, the largest last; a rank without rows to complete offers
    ``(NO_ROWS, 0)`` and decodes a row of padding so as to join every forward)."""

    def __init__(
        self,
        d: DistillConfig,
        batches: Batches,
        total: Callable[[torch.Tensor], torch.Tensor] | None = None,
        agree: Callable[[int, int], tuple[int, int]] | None = None,
    ):
        self.d, self.batches, self.agree = d, batches, agree
        self.total = total or (lambda counts: counts)
        dataset = batches.dataset
        self.masked = bool(dataset.masked)
        manifest: dict[str, Any] = getattr(dataset, "manifest", {})
        self.eos: int | None = manifest.get("eos")
        self.pad = self.eos if self.eos is not None else 0
        self.sampling: dict[str, Any] = dict(
            max_new_tokens=d.max_new_tokens, temperature=d.gen_temperature, top_p=d.top_p, eos=self.eos, pad=self.pad
        )
        self.stats = torch.zeros(len(STATS), dtype=torch.float64)
        # The step's micro-batches on this rank, written ahead: (step, [(rollout, what the teacher was sent)]).
        self.prepared: tuple[int, list[tuple[Rollout, Any]]] | None = None
        # The last step's completions on this rank: (global sample index, tokens, prompt length, completion length).
        self.examples: list[tuple[int, list[int], int, int]] = []

    def rows(self, step: int, micro: int) -> torch.Tensor:
        """Which rows of this rank's micro-batch ``micro`` of step ``step`` are on-policy (bool)."""
        b = self.batches
        chosen = on_policy_rows(b.seed, step, b.batch_size, self.d.lmbda)
        return local_slice(chosen, b.shard, micro)

    def rollout(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, micro: int, autocast) -> Rollout:
        """The micro-batch with the on-policy rows completed by ``model`` (no gradient, eval mode)."""
        b, d = self.batches, self.d
        on = self.rows(step, micro)
        index = on.nonzero().flatten()
        on_device = index.to(x.device)
        x_on, y_on = x[on_device], y[on_device]
        prompts = prompt_lengths(x_on, y_on, self.masked, d.prompt_tokens)
        span = None
        if self.agree is not None:
            width = x.shape[1] + 1
            ends = (prompts + d.max_new_tokens).clamp_max(width)
            mine = (int(prompts.min()), int(ends.max())) if len(index) else None
            span = self.agree(*(mine or (NO_ROWS, 0)))
            if span[1] > 0 and mine is None:  # join the other ranks' forwards with a row of padding
                filler = torch.full((1, width), self.pad, dtype=x.dtype, device=x.device)
                with autocast:
                    generate(model, filler, torch.tensor([span[0]]), [torch.Generator()], span=span, **self.sampling)
        if not len(index):
            return Rollout(x, y, torch.full_like(y, IGNORE_INDEX), on.to(x.device), None)
        global_rows = local_slice(torch.arange(b.batch_size), b.shard, micro)[index].tolist()
        generators = [torch.Generator().manual_seed(sample_seed(b.seed, step, i)) for i in global_rows]
        rows = torch.cat([x_on, torch.full_like(x_on[:, :1], self.pad)], dim=1)
        with autocast:
            c = generate(model, rows, prompts, generators, span=span, **self.sampling)
        x2 = x.clone()
        x2[on_device] = c.tokens[:, :-1]
        y_off = y.clone()
        y_off[on_device] = IGNORE_INDEX
        y_completion = torch.full_like(y, IGNORE_INDEX)
        y_completion[on_device] = completion_labels(c)
        if micro == 0:
            self.examples = []
        self.examples += [
            (row, c.tokens[i].tolist(), int(c.prompts[i]), int(c.lengths[i])) for i, row in enumerate(global_rows)
        ]
        return Rollout(x2, y_off, y_completion, on.to(x.device), c)

    def prepare(self, generator: nn.Module, teacher: Teacher, step: int, device: torch.device, autocast) -> None:
        """Write the completions of every micro-batch of step ``step`` on this rank, hand each to the teacher as soon
        as it exists, and set each rollout's row shares and token scales from the global batch's token counts."""
        b = self.batches
        world, accum = b.shard.world, b.shard.grad_accum
        prepared = []
        for micro in range(accum):
            x, y = b.train(step, micro)
            rollout = self.rollout(generator, x, y, step, micro, autocast)
            prepared.append((rollout, teacher.send_samples(rollout.x, rollout.y_on, rollout.on, rollout.start)))
        local = torch.tensor([r.token_counts() for r, _ in prepared], dtype=torch.float64)
        totals = self.total(local.sum(0).to(device)).cpu()
        on_rows = int(on_policy_rows(b.seed, step, b.batch_size, self.d.lmbda).sum())
        shares = (1 - on_rows / b.batch_size, on_rows / b.batch_size)
        for (rollout, _), counts in zip(prepared, local.tolist()):
            s_off, s_on = (n / total * world * accum if total > 0 else 0.0 for n, total in zip(counts, totals.tolist()))
            rollout.shares, rollout.scales = shares, (s_off, s_on)
        self.prepared = (step, prepared)

    def losses(
        self,
        student: nn.Module,
        generator: nn.Module,
        teacher: Teacher,
        x: torch.Tensor,
        y: torch.Tensor,
        step: int,
        micro: int,
        fused: bool,
        autocast,
    ) -> dict[str, torch.Tensor]:
        """The mixed loss terms of micro-batch ``micro`` (``student``: the module that trains, maybe a DDP wrapper;
        ``generator``: the student module itself, which writes the completions); adds to ``stats``. ``x``, ``y``: the
        micro-batch as read; its completions were written at the step's first micro-batch (``prepare``)."""
        if self.prepared is None or self.prepared[0] != step:
            self.prepare(generator, teacher, step, x.device, autocast)
        assert self.prepared is not None  # prepare set it
        rollout, sent = self.prepared[1][micro]
        # scored through the teacher's usual call (replicate, shard), or on ranks of its own (remote)
        t_out = teacher.score(rollout.x, rollout.on, rollout.start, step, micro, sent)
        if fused:
            head = partial(fused_mixed_losses, rollout=rollout, teacher=t_out, d=self.d)
            out = student(rollout.x, head=head)
        else:
            logits = student(rollout.x)
            n_off, n_on = rollout.token_counts()
            off = logit_losses(logits, rollout.y_off, t_out, self.d) if n_off else None
            on = logit_losses(logits, rollout.y_on, t_out, dataclasses.replace(self.d, alpha=1.0)) if n_on else None
            out = mixed(off, on, rollout, logits.new_zeros((), dtype=torch.float32))
        on_policy = out.pop("distill/on_policy")  # a step's value is a mean over its tokens: through ``stats``
        if rollout.completions is not None:
            c = rollout.completions
            kept = rollout.y_on != IGNORE_INDEX
            tokens = float(kept.sum())
            with torch.no_grad():
                if t_out.aligned is not None:  # a teacher of another tokenizer: the completions' text, in its tokens
                    logprob = text_logprob(t_out.aligned, completion_chars(rollout.y_on, t_out.aligned.alignment))
                elif t_out.label_logprob is not None:  # a compact wire: the teacher rank graded each next token
                    logprob = t_out.label_logprob[kept].double().sum()
                else:
                    logprob = teacher_logprob_sum(teacher_logits_at(t_out, kept), rollout.y_on[kept])
            values = [float(on_policy) * tokens, float(logprob), tokens, len(c.lengths), float(c.eos.sum()), c.seconds]
            self.stats += torch.tensor(values, dtype=torch.float64)
        return out

    def pop_stats(self) -> torch.Tensor:
        stats, self.stats = self.stats, torch.zeros_like(self.stats)
        return stats


SAMPLE_COLUMNS = ["step", "sample", "prompt", "completion", "tokens"]


def sample_rows(examples: list[tuple[int, list[int], int, int]], decode, step: int) -> list[list]:
    """Table rows of ``examples`` (every rank's, any order), by sample index: prompt and completion as text."""
    rows = []
    for index, tokens, prompt, length in sorted(examples):
        rows.append([step, index, decode(tokens[:prompt]), decode(tokens[prompt : prompt + length]), length])
    return rows
