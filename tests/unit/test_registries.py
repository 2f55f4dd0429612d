"""Kinds register themselves: a divergence or a pruning kind registered in a test alone is accepted by the config
checks and used by the losses and the compressor; an unknown name is refused with the list of the registered ones."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FAST, preflight_in_process
from trainer import models
from trainer.compress import PRUNERS, Pruner, build_compressor, pruning_kind, validate_modifiers
from trainer.config import ConfigError, DistillConfig, ModifierConfig
from trainer.distill.divergence import DIVERGENCES, divergence
from trainer.distill.fused import fused_logit_losses
from trainer.distill.interface import TeacherOutput
from trainer.distill.losses import kd_loss, logit_losses
from trainer.preflight import check_distill_loss

TV = "total_variation"
ROWS, TOKENS, HIDDEN, VOCAB, T = 2, 5, 8, 11, 2.0


@pytest.fixture
def total_variation():
    """A divergence registered for one test: half the L1 distance between the two distributions."""

    @divergence(TV)
    def _(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
        return 0.5 * (logp_s.exp() - logp_t.exp()).abs().sum(-1)

    yield TV
    del DIVERGENCES[TV]


def tv_reference(student, teacher, top_k=None):
    """float64: T**2 times the mean over tokens of the total variation of softmax(x / T), over the teacher's top-k
    and the tail bucket when ``top_k``."""
    s, t = student.double(), teacher.double()
    if top_k is not None:
        idx = t.topk(top_k, dim=-1).indices

        def buckets(x):
            rest = T * torch.logsumexp(x.scatter(-1, idx, -torch.inf) / T, -1, keepdim=True)
            return torch.cat([x.gather(-1, idx), rest], -1)

        s, t = buckets(s), buckets(t)
    per_token = 0.5 * (torch.softmax(s / T, -1) - torch.softmax(t / T, -1)).abs().sum(-1)
    return per_token.mean() * T**2


def logits_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, TOKENS, VOCAB, generator=g) * 2, torch.randn(ROWS, TOKENS, VOCAB, generator=g) * 2


def labels():
    return torch.randint(0, VOCAB, (ROWS, TOKENS), generator=torch.Generator().manual_seed(1))


def test_a_registered_divergence_passes_the_config_check(total_variation):
    check_distill_loss(DistillConfig(loss=total_variation))
    check_distill_loss(DistillConfig(loss="none"))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_a_registered_divergence_is_the_loss(total_variation, chunk_size):
    student, teacher = logits_pair()
    student.requires_grad_()
    d = DistillConfig(loss=total_variation, alpha=0.5, temperature=T, chunk_size=chunk_size)
    kd = logit_losses(student, labels(), TeacherOutput(logits=teacher), d)["distill/kd"]
    expected = student.detach().double().requires_grad_()
    want = tv_reference(expected, teacher)
    torch.testing.assert_close(kd.double(), want, rtol=1e-5, atol=1e-6)
    kd.backward()
    want.backward()
    assert student.grad is not None and expected.grad is not None
    torch.testing.assert_close(student.grad.double(), expected.grad, rtol=1e-4, atol=1e-6)


def test_a_registered_divergence_over_the_top_k_and_its_tail(total_variation):
    student, teacher = logits_pair(2)
    d = DistillConfig(loss=total_variation, alpha=0.5, temperature=T, top_k=4, top_k_tail=True)
    kd = logit_losses(student, labels(), TeacherOutput(logits=teacher), d)["distill/kd"]
    torch.testing.assert_close(kd.double(), tv_reference(student, teacher, top_k=4), rtol=1e-5, atol=1e-6)


def test_a_registered_divergence_in_the_fused_loss(total_variation):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(ROWS, TOKENS, HIDDEN, generator=g), torch.randn(VOCAB, HIDDEN, generator=g)
    t_hidden, t_weight = torch.randn(ROWS, TOKENS, HIDDEN, generator=g), torch.randn(VOCAB, HIDDEN, generator=g)
    d = DistillConfig(loss=total_variation, alpha=0.5, temperature=T, chunk_size=4)
    teacher = TeacherOutput(head=(t_hidden, t_weight, None))
    kd = fused_logit_losses(hidden, weight, None, labels(), teacher, d)["distill/kd"]
    want = tv_reference(F.linear(hidden, weight), F.linear(t_hidden, t_weight))
    torch.testing.assert_close(kd.double(), want, rtol=1e-5, atol=1e-6)


def test_an_unknown_divergence_is_refused_with_the_registered_ones(total_variation, tmp_path, monkeypatch):
    listed = f"none, forward_kl, reverse_kl, jsd, {total_variation} (got 'kl')"
    with pytest.raises(ConfigError, match=re.escape(f"distill.loss: must be one of {listed}")):
        check_distill_loss(DistillConfig(loss="kl"))
    code, lines = preflight_in_process(tmp_path, monkeypatch, *FAST, "distill=kd", "distill.loss=kl")
    assert code == 2 and lines == [f"config error: distill.loss: must be one of {listed}"], lines
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match=f"unknown distillation loss kind 'kl'; expected one of: .*, {TV}$"):
        kd_loss(student, teacher, kind="kl")


def test_the_registry_is_read_at_check_time():
    """Once the test's divergence is removed, its name is refused again and no longer listed."""
    assert TV not in DIVERGENCES
    with pytest.raises(ConfigError, match=rf"must be one of none, forward_kl, reverse_kl, jsd \(got '{TV}'\)"):
        check_distill_loss(DistillConfig(loss=TV))


@pytest.mark.parametrize("name", ["none", "jsd"])
def test_a_taken_divergence_name_is_refused(name):
    with pytest.raises(ValueError, match=f"the divergence name '{name}' is taken"):
        divergence(name)(lambda logp_s, logp_t, beta: logp_s.sum(-1))


# ----------------------------------------------------------------------------- pruning kinds

LEADING = "leading"


@pytest.fixture
def leading():
    """A pruning kind registered for one test: the first entries of each weight (flattened), on the schedule."""

    @pruning_kind(LEADING)
    class LeadingPruner(Pruner):
        def masks_at(self, params, masks, sparsity):
            out = {}
            for name in self.weights:
                keep = torch.ones(masks[name].numel(), dtype=torch.bool)
                keep[: round(sparsity * keep.numel())] = False
                out[name] = masks[name] & keep.view_as(masks[name])
            return out

    yield LEADING
    del PRUNERS[LEADING]


def tiny_gpt():
    torch.manual_seed(0)
    return models.build("gpt", vocab_size=17, n_layer=2, n_head=2, n_embd=32, block_size=16)


def test_a_registered_pruning_kind_passes_the_checks_and_prunes(leading):
    mod = ModifierConfig(kind=leading, targets=["blocks.*.mlp.*"], schedule="constant", final_sparsity=0.25)
    validate_modifiers([mod], models.family("gpt"))
    with pytest.raises(ConfigError, match="compress.modifiers.0.final_sparsity: must be in"):  # the default checks
        validate_modifiers([ModifierConfig(kind=leading, final_sparsity=1.0)], models.family("gpt"))
    model = tiny_gpt()
    compressor = build_compressor(model, [mod])
    compressor.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))  # the one-shot update at step 0
    (pruner,) = compressor.pruners
    assert pruner.kind == leading and pruner.weights
    for name in pruner.weights:
        flat = model.get_parameter(name).detach().flatten()
        cut = round(0.25 * flat.numel())
        assert bool((flat[:cut] == 0).all()) and bool((flat[cut:] != 0).all()), name
    assert compressor.counts_are_exact


def test_an_unknown_pruning_kind_is_refused_with_the_registered_ones(leading):
    message = "compress.modifiers.0.kind: unknown kind 'prune' (expected one of magnitude, channel, nm, leading, qat)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_modifiers([ModifierConfig(kind="prune")], models.family("gpt"))


def test_the_pruning_registry_is_read_at_check_time():
    assert LEADING not in PRUNERS
    with pytest.raises(ConfigError, match=r"unknown kind 'leading' \(expected one of magnitude, channel, nm, qat\)"):
        validate_modifiers([ModifierConfig(kind=LEADING)], models.family("gpt"))


@pytest.mark.parametrize("name", ["qat", "magnitude"])
def test_a_taken_pruning_kind_is_refused(name):
    with pytest.raises(ValueError, match=f"the modifier kind '{name}' is taken"):
        pruning_kind(name)(type("Again", (Pruner,), {}))
