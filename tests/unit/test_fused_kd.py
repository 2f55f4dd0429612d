"""fused_linear_kd_loss against float64 references on full logits (values and gradients for the student's hidden
states, head weight and bias), over kinds, temperatures, beta, top-k with and without the tail, ignore patterns,
biases, tied heads and chunk sizes; and kd_loss's tail against the same reference."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import HF_VOCAB, small_hf_config
from tests.kd_reference import per_token_divergence
from trainer import models
from trainer.distill.fused import FusedSettings, TeacherSide, fused_kd_terms
from trainer.distill.losses import fused_linear_kd_loss, kd_loss
from trainer.models.hf import DECODERS
from trainer.models.protocol import FINAL_HIDDEN, family_of, fuses_head

KINDS = ["forward_kl", "reverse_kl", "jsd"]
N_ROWS, N_TOKENS, H_S, H_T, V = 2, 6, 8, 12, 20
IGNORE = -100


def reference(student, teacher, kind, temperature, beta=0.5, top_k=None, tail=False, labels=None, alpha=1.0):
    """Float64 formulas on full logits: softmax, log, the divergence (over the top-k and the tail bucket when
    asked), mean over kept tokens times T**2, plus (1 - alpha) * the cross-entropy. The student's logits past the
    teacher's vocabulary are left out of the divergence."""
    s, t = student[..., : teacher.shape[-1]].double(), teacher.double()
    if top_k is not None:
        idx = t.topk(top_k, dim=-1).indices

        def buckets(x):
            picked = x.gather(-1, idx)
            if not tail:
                return picked
            rest = temperature * torch.logsumexp(x.scatter(-1, idx, -torch.inf) / temperature, -1, keepdim=True)
            return torch.cat([picked, rest], -1)

        s, t = buckets(s), buckets(t)
    p_s, p_t = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    per_token = per_token_divergence(p_s, p_t, kind, beta)
    keep = torch.ones(per_token.shape, dtype=torch.bool) if labels is None else labels != IGNORE
    count = max(int(keep.sum()), 1)
    kd = (per_token * keep).sum() / count * temperature**2
    if alpha == 1.0:
        return kd
    ce = -torch.log_softmax(student.double(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return alpha * kd + (1 - alpha) * (ce * keep).sum() / count


def make(seed=0, bias=False, ignore="some", vocab_s=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_ROWS, N_TOKENS, H_S, generator=g)
    weight = torch.randn(vocab_s, H_S, generator=g) * 0.7
    t_hidden = torch.randn(N_ROWS, N_TOKENS, H_T, generator=g)
    t_weight = torch.randn(V, H_T, generator=g) * 0.7
    s_bias = torch.randn(vocab_s, generator=g) if bias else None
    t_bias = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, vocab_s, (N_ROWS, N_TOKENS), generator=g)
    if ignore == "some":
        labels[0, :2] = IGNORE
        labels[1, -1] = IGNORE
    elif ignore == "row":  # every label of one row ignored
        labels[1] = IGNORE
    elif ignore == "all":
        labels[:] = IGNORE
    return hidden, weight, s_bias, t_hidden, t_weight, t_bias, labels


def logits(hidden, weight, bias):
    out = hidden @ weight.T
    return out if bias is None else out + bias


def fused_value_and_grads(hidden, weight, bias, t_hidden, t_weight, t_bias, **kwargs):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    loss = fused_linear_kd_loss(
        leaves[0], leaves[1], t_hidden, t_weight, student_head_bias=leaves[2], teacher_head_bias=t_bias, **kwargs
    )
    loss.backward()
    return loss.detach(), [None if x is None else x.grad for x in leaves]


def reference_value_and_grads(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, **kwargs):
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    t = logits(t_hidden.double(), t_weight.double(), None if t_bias is None else t_bias.double())
    loss = reference(logits(*leaves), t, labels=labels, **kwargs)
    loss.backward()
    return loss.detach(), [None if x is None else x.grad for x in leaves]


def assert_close(actual, expected):
    # fp32 against float64: the top-k tail's bucket is a difference of sums (the teacher's from its logsumexp, as a
    # cache has it), which costs up to ~2e-6 absolute in gradients of O(0.05) with reverse KL; kd_loss on the
    # full fp32 logits has the same error.
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=5e-6 if actual.dim() else 1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("ignore", ["none", "some", "row", "all"])
@pytest.mark.parametrize("top_k,tail", [(None, False), (5, False), (5, True)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_reference(kind, temperature, top_k, tail, ignore, chunk_size):
    hidden, weight, bias, t_hidden, t_weight, t_bias, labels = make(ignore=ignore)
    settings = dict(kind=kind, temperature=temperature, top_k=top_k)
    value, grads = fused_value_and_grads(
        hidden,
        weight,
        bias,
        t_hidden,
        t_weight,
        t_bias,
        labels=None if ignore == "none" else labels,
        chunk_size=chunk_size,
        top_k_tail=tail,
        **settings,
    )
    expected, expected_grads = reference_value_and_grads(
        hidden, weight, bias, t_hidden, t_weight, t_bias, None if ignore == "none" else labels, tail=tail, **settings
    )
    assert_close(value, expected)
    for got, want in zip(grads[:2], expected_grads[:2]):
        assert_close(got, want)


@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("top_k,tail", [(None, False), (4, True)])
@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_jsd_beta_alpha_bias_and_padded_student(beta, top_k, tail, alpha):
    """A student vocabulary padded past the teacher's (its extra logits are left out of the KD, kept in the CE)."""
    hidden, weight, bias, t_hidden, t_weight, t_bias, labels = make(seed=1, bias=True, vocab_s=V + 3)
    settings = dict(kind="jsd", temperature=2.0, beta=beta, top_k=top_k, alpha=alpha)
    value, grads = fused_value_and_grads(
        hidden, weight, bias, t_hidden, t_weight, t_bias, labels=labels, chunk_size=7, top_k_tail=tail, **settings
    )
    expected, expected_grads = reference_value_and_grads(
        hidden, weight, bias, t_hidden, t_weight, t_bias, labels, tail=tail, **settings
    )
    assert_close(value, expected)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_tied_head_gradient_adds_to_the_embedding(chunk_size):
    """The head weight is the embedding: its gradient from the loss adds to the one through the input lookup."""
    g = torch.Generator().manual_seed(2)
    embedding, mix = torch.randn(V, H_S, generator=g), torch.randn(H_S, H_S, generator=g) * 0.3
    ids = torch.randint(0, V, (N_ROWS, N_TOKENS), generator=g)
    _, _, _, t_hidden, t_weight, _, labels = make(seed=2)

    def run(fused: bool, dtype):
        table = embedding.to(dtype).detach().requires_grad_()
        hidden = torch.tanh(table[ids] @ mix.to(dtype))
        if fused:
            loss = fused_linear_kd_loss(
                hidden,
                table,
                t_hidden,
                t_weight,
                kind="forward_kl",
                temperature=2.0,
                labels=labels,
                chunk_size=chunk_size,
                alpha=0.5,
            )
        else:
            loss = reference(
                hidden @ table.T, t_hidden.to(dtype) @ t_weight.to(dtype).T, "forward_kl", 2.0, labels=labels, alpha=0.5
            )
        loss.backward()
        return loss.detach(), table.grad

    value, grad = run(True, torch.float32)
    expected, expected_grad = run(False, torch.float64)
    assert_close(value, expected)
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("teacher_kind", ["logits", "topk"])
def test_teacher_logits_or_cached_top_k_match_the_head(teacher_kind, tail):
    """A remote teacher's full logits, or a cache's top-k with its logsumexp: the same as the teacher's head."""
    hidden, weight, _, t_hidden, t_weight, _, labels = make(seed=3)
    t_logits = t_hidden @ t_weight.T
    how = FusedSettings("forward_kl", 2.0, 0.5, 0.7, 6, tail, 5)
    head = TeacherSide(hidden=t_hidden, weight=t_weight)
    if teacher_kind == "logits":
        other = TeacherSide(logits=t_logits)
    else:
        values, indices = t_logits.topk(6, dim=-1)
        other = TeacherSide(
            topk=(values, indices),
            lse=torch.logsumexp(t_logits / 2.0, -1),
        )
    expected = fused_kd_terms(hidden, weight, None, head, how, labels)
    got = fused_kd_terms(hidden, weight, None, other, how, labels)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_tail_matches_reference(kind):
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(3, 5, V, generator=g) * 2, torch.randn(3, 5, V, generator=g) * 2
    labels = torch.randint(0, V, (3, 5), generator=g)
    labels[0] = IGNORE
    for chunk_size in (None, 4):
        s = student.clone().requires_grad_()
        loss = kd_loss(
            s, teacher, kind=kind, temperature=2.0, top_k=5, top_k_tail=True, labels=labels, chunk_size=chunk_size
        )
        loss.backward()
        s64 = student.double().requires_grad_()
        expected = reference(s64, teacher, kind, 2.0, top_k=5, tail=True, labels=labels)
        expected.backward()
        assert_close(loss, expected)
        assert_close(s.grad, s64.grad)


def test_tail_closer_to_full_than_top_k_alone():
    """The tail bucket's divergence is nearer the full one than top-k without it."""
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(64, 200, generator=g), torch.randn(64, 200, generator=g) * 3
    full = kd_loss(student, teacher, kind="forward_kl", temperature=2.0)
    plain = kd_loss(student, teacher, kind="forward_kl", temperature=2.0, top_k=8)
    tail = kd_loss(student, teacher, kind="forward_kl", temperature=2.0, top_k=8, top_k_tail=True)
    assert abs(tail - full) < abs(plain - full)


def test_without_grad_and_bad_arguments():
    hidden, weight, _, t_hidden, t_weight, _, labels = make(seed=6)
    with torch.no_grad():
        value = fused_linear_kd_loss(hidden, weight, t_hidden, t_weight, kind="reverse_kl", labels=labels, chunk_size=3)
    expected, _ = reference_value_and_grads(
        hidden, weight, None, t_hidden, t_weight, None, labels, kind="reverse_kl", temperature=1.0
    )
    assert_close(value, expected)
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_kd_loss(hidden, weight, t_hidden, t_weight, kind="jsd", alpha=0.5)
    with pytest.raises(ValueError, match="tail needs k <"):
        fused_linear_kd_loss(hidden, weight, t_hidden, t_weight, kind="jsd", top_k=V, top_k_tail=True)
    with pytest.raises(ValueError, match="differ outside the last dim"):
        fused_linear_kd_loss(hidden, weight, t_hidden[:1], t_weight, kind="jsd")


@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("kind", KINDS)
def test_soft_capped_logits_match_float64_reference(kind, alpha):
    """Gemma's ``c * tanh(z / c)`` on the student's head output (c = 2: most logits here are capped hard), in the
    KD and CE parts and their gradients, against the float64 formulas on the capped logits."""
    hidden, weight, _, t_hidden, t_weight, _, labels = make(seed=3)
    cap = 2.0
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
    teacher = TeacherSide(hidden=t_hidden, weight=t_weight)
    how = FusedSettings(kind, 1.5, 0.5, alpha, None, False, 5, softcap=cap)
    value, _, _ = fused_kd_terms(leaves[0], leaves[1], None, teacher, how, labels=labels)
    value.backward()
    wide = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    capped = cap * torch.tanh(logits(*wide, None) / cap)
    expected = reference(
        capped, logits(t_hidden.double(), t_weight.double(), None), kind, 1.5, labels=labels, alpha=alpha
    )
    expected.backward()
    assert_close(value.detach(), expected.detach())
    for got, want in zip(leaves, wide):
        assert_close(got.grad, want.grad)


def test_the_gradients_are_handed_over_once():
    hidden, weight, _, t_hidden, t_weight, _, _ = make(seed=7)
    loss = fused_linear_kd_loss(hidden.requires_grad_(), weight, t_hidden, t_weight, kind="jsd", chunk_size=5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def protocol_model(kind: str) -> torch.nn.Module:
    if kind == "gpt":
        return models.build("gpt", vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=N_TOKENS)
    transformers = pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")
    config = small_hf_config(kind)
    return DECODERS[config.model_type].wrap(transformers.AutoModelForCausalLM.from_config(config).float(), None)


def capped_linear(hidden, weight, bias, softcap=None):
    out = torch.nn.functional.linear(hidden, weight, bias)
    return out if softcap is None else softcap * torch.tanh(out / softcap)


@pytest.mark.parametrize("kind", ["gpt", "llama", "qwen2", "phi3", "olmo2", "gemma3", "gpt2"])
def test_models_run_a_head_function_in_place_of_their_head(kind):
    """``model(x, head=fn)`` returns ``fn(final hidden, weight, bias)`` (with ``softcap=c`` where the model caps its
    logits: Gemma 3 here); with the plain head, capped as asked, it is the model."""
    torch.manual_seed(0)
    model = protocol_model(kind).eval()
    x = torch.randint(0, HF_VOCAB if kind != "gpt" else V, (2, N_TOKENS), generator=torch.Generator().manual_seed(1))
    assert fuses_head(model) and family_of(model).logit_softcap(model) == (30.0 if kind == "gemma3" else None)
    torch.testing.assert_close(model(x, head=capped_linear), model(x), rtol=0, atol=0)
    out, hidden = model(x, hidden_layers=(FINAL_HIDDEN,), head=lambda h, w, b, **_: (h, w))
    assert torch.equal(out[0], hidden[FINAL_HIDDEN]) and out[1] is family_of(model).head(model).weight


def test_a_head_that_is_not_a_plain_linear_is_not_fused():
    """A fake-quantized head (a Linear subclass computing its logits from other weights) keeps the full logits."""

    class FakeQuantized(torch.nn.Linear):
        pass

    model = protocol_model("gpt")
    model.head = FakeQuantized(16, V, bias=False)
    assert not fuses_head(model)
