"""The teacher as a placement: one callable the loop asks for a micro-batch's teacher output.

- ``replicate``: a whole frozen copy on every rank.
- ``shard``: FSDP2 over every data-parallel rank (one flat axis), frozen, forward only, parameters resharded
  after each forward, so a rank holds about 1/N of the teacher between forwards (``parallel.frozen``).
- ``cache``: no model; top-k logits written by ``python -m trainer.cache`` (``trainer/distill/cached.py``).
- ``remote``: the teacher on ranks of its own (``parallel.remote``); this rank sends inputs, receives logits.

The loop asks a teacher what it can do (``scores_eval_batches``, ``whole_module``), never which placement it is
(``trainer/distill/interface.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.collectives import first_error
from parallel.frozen import shard_frozen, teacher_mesh
from parallel.mesh import ParallelDims
from parallel.remote import PendingLogits, RemoteClient, Roles
from trainer import cache, models
from trainer.cache import compact
from trainer.data.errors import DataError
from trainer.distill import shard_load
from trainer.distill import teacher as teacher_io
from trainer.distill.align import AlignedLogits, Aligner
from trainer.distill.cached import CachedTeacher
from trainer.distill.interface import Teacher, TeacherOutput
from trainer.models import hf as hf_folders
from trainer.models.hf import causal_lm, gguf
from trainer.models.protocol import family_of, fuses_head

if TYPE_CHECKING:
    from trainer.config import DistillConfig, TeacherConfig
    from trainer.data import Shard


class LiveTeacher(Teacher):
    """A frozen model in memory (``replicate`` or ``shard``); ``step`` and ``micro`` are not needed. With ``fused``
    it returns its head's input and parameters instead of logits (the fused loss computes them a chunk at a time)."""

    module: nn.Module

    def __init__(self, module: nn.Module, placement: str, hidden_layers: tuple[int, ...] = (), fused: bool = False):
        super().__init__()
        self.module, self.placement, self.hidden_layers, self.gives_head = module, placement, hidden_layers, fused

    @property
    def whole_module(self) -> nn.Module | None:
        return self.module if self.placement == "replicate" else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        if self.gives_head:
            out = self.module(x, hidden_layers=self.hidden_layers, head=_head_inputs)
            head, hidden = out if self.hidden_layers else (out, None)
            return TeacherOutput(head=head, hidden=hidden)
        out = self.module(x, hidden_layers=self.hidden_layers)
        logits, hidden = out if self.hidden_layers else (out, None)
        return TeacherOutput(logits=logits, hidden=hidden)

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _head_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return hidden, weight, bias


class AlignedTeacher(Teacher):
    """A teacher of another tokenizer, replicated or sharded (``placement``): it reads the text of the student's tokens
    in its own tokens (``Aligner``) and returns its logits with the aligned positions. Its logits say nothing of the
    student's evaluation batches (another vocabulary), so it scores none of them."""

    scores_eval_batches = False
    needs_student_logits = True

    def __init__(
        self, module: nn.Module | None, aligner: Aligner, how: str, context: int | None = None, placement: str = ""
    ):
        """``context``: the teacher's positions (None: unknown); a row longer in its tokens stops the run."""
        super().__init__()
        self.module, self.aligner, self.how, self.context = module, aligner, how, context
        self.placement = placement or "replicate"

    def teacher_logits(self, teacher_ids: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """The teacher's logits of its own tokens ``teacher_ids`` of micro-batch ``micro`` of step ``step`` (a sharded
        module's forward is a collective)."""
        assert self.module is not None  # a teacher here; RemoteAlignedTeacher asks its teacher rank
        return self.module(teacher_ids)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        alignment = self.aligner(x)
        width = alignment.teacher_ids.shape[1]
        problem = None
        if self.context is not None and width > self.context:
            problem = (
                f"a row of {x.shape[1]} student tokens is {width} tokens of the teacher's tokenizer, more than its "
                f"{self.context} positions (at step {step}): lower student.block_size"
            )
        problem = first_error(problem, x.device)  # every rank stops at the same step
        if problem is not None:
            raise DataError("student.block_size", problem)
        logits = self.teacher_logits(alignment.teacher_ids, step, micro)
        return TeacherOutput(aligned=AlignedLogits(logits, alignment, self.aligner.shared, self.how))


class RemoteAlignedTeacher(AlignedTeacher):
    """A teacher of another tokenizer on a teacher rank: this rank aligns its rows and sends the text in the teacher's
    tokens; its client requests the next training micro-batch's ahead (its ``next_input`` aligns that batch too)."""

    def __init__(self, client: RemoteClient, aligner: Aligner, how: str, context: int | None = None):
        super().__init__(None, aligner, how, context, placement="remote")
        self.client = client

    def teacher_logits(self, teacher_ids: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        return self.client.logits(teacher_ids, None if step < 0 else (step, micro))[0]

    def close(self) -> None:
        self.client.close()


class EnsembleTeacher(Teacher):
    """Several teachers (``teacher=ensemble``), each in its own placement and with its weight: the output is each
    member's, which the loss compares with the student's logits on its own (a weighted sum of KD terms, not KD against
    a mixture of their distributions, which would need one vocabulary). It scores no evaluation batch (its members
    may not share the student's vocabulary)."""

    placement = "replicate"
    scores_eval_batches = False
    needs_student_logits = True

    def __init__(self, members: list[tuple[float, Teacher]]):
        super().__init__()
        self.members = members

    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        return TeacherOutput(members=[(weight, member.forward(x, step, micro)) for weight, member in self.members])

    def parameters(self) -> list[torch.Tensor]:
        return [p for _, member in self.members for p in member.parameters()]

    def close(self) -> None:
        for _, member in self.members:
            member.close()


class RemoteTeacher(Teacher):
    """Logits from a dedicated teacher rank; the next training micro-batch's are requested ahead (see
    ``parallel.remote``). ``step`` -1 marks an evaluation batch."""

    placement = "remote"
    scores_apart = True

    def __init__(self, client: RemoteClient, compact_wire: tuple[int, float] | None = None):
        """``compact_wire``: (k, temperature) when training batches come back as compact top-k rows with the tail's
        mass at that temperature (``teacher.wire=compact``; the client's wire packs them)."""
        super().__init__()
        self.client, self.compact_wire = client, compact_wire

    def forward(self, x: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        reply = self.client.logits(x, None if step < 0 else (step, micro))
        return TeacherOutput(logits=reply[0]) if step < 0 else self.output(reply, x.device)

    def output(self, reply: list[torch.Tensor], device: torch.device) -> TeacherOutput:
        """A training batch's reply: its logits, or the top-k with the log-sum-exp the compact rows give."""
        if self.compact_wire is None:
            return TeacherOutput(logits=reply[0])
        k, temperature = self.compact_wire
        value_rows, index_rows, tail = (part.cpu() for part in reply)
        values, indices, lse = compact.unpack(value_rows.numpy(), index_rows.numpy(), tail, k, self.client.vocab,
                                              temperature)  # fmt: skip
        return TeacherOutput(topk=(values.to(device), indices.to(device)), lse=lse.to(device))

    def send_samples(self, x: torch.Tensor, labels: torch.Tensor, on: torch.Tensor, start: int) -> PendingLogits | None:
        """The student's samples (rows ``on``) go to the teacher rank as they are; their logits come back from
        position ``start`` on, or over a compact wire their compact rows and the teacher's log-probability of each
        next token (the rows go with the label after their last position: a completion may end past the row)."""
        if not bool(on.any()):
            return None
        if self.compact_wire is None:
            return self.client.request(x[on], start)
        after = labels[on][:, -1:].clamp_min(0)  # no label there (IGNORE_INDEX): a token that is graded nowhere
        return self.client.request(torch.cat([x[on], after], dim=1), start, graded=True)

    def forward_samples(
        self, x: torch.Tensor, on: torch.Tensor, start: int, step: int, micro: int, sent: Any
    ) -> TeacherOutput:
        """The samples' output (``sent`` ahead, by ``send_samples``) and the other rows', requested ahead too (their
        inputs are known beforehand), in one output: placeholders where nothing is needed."""
        if self.compact_wire is not None:
            return self.compact_samples(x, on, start, step, micro, sent)
        logits = torch.zeros(*x.shape, self.client.vocab, device=x.device)
        if not bool(on.all()):
            logits[~on] = self.client.logits(x[~on], (step, micro))[0]
        if sent is not None:
            logits[on, start:] = sent.wait()
        return TeacherOutput(logits=logits)

    def compact_samples(
        self, x: torch.Tensor, on: torch.Tensor, start: int, step: int, micro: int, sent: PendingLogits | None
    ) -> TeacherOutput:
        """``forward_samples`` over a compact wire: top-k rows for every row, and the samples' next-token
        log-probabilities. Positions no label reads hold a top-k of distinct ids, zeros and a tail of nothing."""
        k = self.compact_wire[0] if self.compact_wire is not None else 0
        values = torch.zeros(*x.shape, k, device=x.device)
        indices = torch.arange(k, device=x.device).expand(*x.shape, k).clone()
        lse = torch.full(x.shape, math.log(k), device=x.device)
        label_logprob = torch.zeros(x.shape, device=x.device)
        parts = []
        if not bool(on.all()):
            parts.append((~on, slice(None), self.output(self.client.logits(x[~on], (step, micro)), x.device)))
        if sent is not None:
            *rows, graded = sent.wait_parts()
            label_logprob[on, start:] = graded.to(x.device)
            parts.append((on, slice(start, None), self.output(rows, x.device)))
        for which, positions, out in parts:
            assert out.topk is not None and out.lse is not None  # a compact reply
            values[which, positions], indices[which, positions] = out.topk
            lse[which, positions] = out.lse
        return TeacherOutput(topk=(values, indices), lse=lse, label_logprob=label_logprob)

    def close(self) -> None:
        self.client.close()


def load_sharded_teacher(
    teacher: TeacherConfig, dims: ParallelDims, device: torch.device, real_vocab: int | None
) -> nn.Module:
    """``teacher`` sharded over every data-parallel rank of ``dims`` (``load_sharded``), frozen, in its
    ``param_dtype``; its logits cut to ``real_vocab`` entries (None: its own)."""
    mesh = teacher_mesh(dims, device.type)

    def shard_module(module: nn.Module) -> nn.Module:
        return shard_frozen(module, mesh, family_of(module).layers(module).values(), teacher.param_dtype)

    return load_sharded(teacher, real_vocab, shard_module, device)


def load_sharded(
    teacher: TeacherConfig, real_vocab: int | None, shard: Callable[[nn.Module], nn.Module], device: torch.device
) -> nn.Module:
    """The teacher as a frozen FSDP2-sharded module. A dense export, a Hugging Face folder with safetensors weights
    or a GGUF file of an architecture ``shard_load.gguf_index`` reads is never whole on any rank (``shard_load``:
    built on the meta device, sharded, then each rank reads its rows of the file); other teachers are loaded whole,
    then sharded. Its logits are cut to ``real_vocab`` entries (None: its own)."""
    path = teacher.checkpoint
    assert path is not None  # only called for a run with a teacher
    kind, folder = teacher_io.resolve(path)
    try:
        source = _on_meta_device(kind, folder, teacher_io.is_dense_export(path))
        if source is None:
            return shard(teacher_io.load(path, device, vocab_size=real_vocab, dtype=teacher.param_dtype))
        skeleton, tensors, stored_as = source
        module = shard_load.load_sharded(skeleton, tensors, folder, stored_as, shard, device)
    except ValueError as e:
        raise teacher_io.TeacherPathError(str(e)) from None
    sliced = teacher_io.slice_vocabulary(module, path, real_vocab)
    return teacher_io.freeze(sliced, device)


def _on_meta_device(
    kind: str, folder: Path, dense_export: bool
) -> tuple[nn.Module, Mapping[str, shard_load.Rows], shard_load.StoredAs] | None:
    """The teacher at ``folder`` (of ``kind``) on the meta device, its stored tensors and their names; None where it
    cannot be read row by row."""
    if kind == "hf" and hf_folders.safetensors_files(folder):
        skeleton = causal_lm.empty(folder)
        return skeleton, shard_load.index(hf_folders.safetensors_files(folder)), causal_lm.stored_as(skeleton)
    if kind == "gguf":
        skeleton = causal_lm.empty_gguf(folder)
        tensors = shard_load.gguf_index(folder, gguf.check_file(folder), cast(causal_lm.HFCausalLM, skeleton).model)
        return None if tensors is None else (skeleton, tensors, causal_lm.stored_as(skeleton))
    if dense_export:
        with torch.device("meta"):
            skeleton = models.build_from_spec(models.read_export_config(folder))
        return skeleton, shard_load.index([folder / models.WEIGHTS_FILE]), _same_name
    return None


def _same_name(name: str) -> tuple[tuple[str, ...], bool]:
    return (name,), False


def build_teacher(
    teacher: TeacherConfig,
    distill: DistillConfig,
    dims: ParallelDims,
    device: torch.device,
    shard: Shard,
    vocab: int,
    real_vocab: int | None,
    next_input: Callable[[tuple], tuple[tuple, torch.Tensor] | None],
    cache_manifest: cache.Manifest | None = None,
    teacher_ranks: int = 0,
    remote_slot: tuple[int, int] = (0, 1),
) -> Teacher:
    """The teacher of ``teacher.placement``, ready to call; the hidden layers are those ``distill``'s feature losses
    use. Its logits have ``real_vocab`` entries (the real vocabulary of a padded one; None: its own), or ``vocab``
    (classes). A cached teacher reads ``teacher.cache_dir``, whose checked manifest is ``cache_manifest``.

    A remote teacher (on the last ``teacher_ranks`` ranks, which hold ``remote_slot``: its index of how many
    teachers) asks ``next_input((step, micro))`` for the micro-batch after ``(step, micro)`` to request it ahead.
    """
    placement = teacher.placement
    if placement == "remote":
        server = Roles(dist.get_world_size(), teacher_ranks).server_of(dist.get_rank())
        logits = real_vocab or vocab  # the teacher rank cuts its logits to the real vocabulary
        if teacher.wire == "compact":
            assert distill.top_k is not None  # preflight: a compact wire sends the top distill.top_k
            wire = compact.wire(distill.top_k, logits, distill.temperature)
            client = RemoteClient(server, logits, next_input, wire, remote_slot)
            return RemoteTeacher(client, (distill.top_k, distill.temperature))
        return RemoteTeacher(RemoteClient(server, logits, next_input, teacher=remote_slot))
    if placement == "cache":
        assert teacher.cache_dir is not None and cache_manifest is not None  # the build checked the cache
        return CachedTeacher(cache.CacheReader(Path(teacher.cache_dir), cache_manifest), shard)
    assert teacher.checkpoint is not None  # preflight: a run with a teacher names it
    if placement == "shard":
        module = load_sharded_teacher(teacher, dims, device, real_vocab)
    else:
        module = teacher_io.load(teacher.checkpoint, device, vocab_size=real_vocab, dtype=teacher.param_dtype)
    # A sharded teacher frees its gathered head after forward: it returns logits, and only the student side is fused.
    fused = distill.fused and distill.loss != "none" and placement == "replicate"
    fused = fused and fuses_head(module) and family_of(module).logit_softcap(module) is None  # a capped head: logits
    return LiveTeacher(module, placement, tuple(f.teacher_layer for f in distill.features), fused)
