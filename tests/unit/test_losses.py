"""kd_loss against a float64 reference written here, plus chunking, top-k, masking and dtype checks."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from tests.kd_reference import per_token_divergence
from trainer.distill.losses import KDLoss, kd_loss, kd_loss_topk

KINDS = ["forward_kl", "reverse_kl", "jsd"]
B, T, V = 2, 16, 50
IGNORE = -100
EPS = torch.finfo(torch.float32).eps


def reference(student, teacher, kind, temperature, beta=0.5, labels=None):
    """Straightforward float64 formulas: softmax, then log, then the divergence, mean over kept tokens."""
    p_s = torch.softmax(student.double() / temperature, dim=-1)
    p_t = torch.softmax(teacher.double() / temperature, dim=-1)
    per_token = per_token_divergence(p_s, p_t, kind, beta)
    if labels is not None:
        per_token = per_token[labels != IGNORE]
    return per_token.mean() * temperature**2


def reference_topk(student, teacher, k, kind, temperature, labels=None):
    """The top-k formula: gather the teacher's top-k indices on both sides, renormalise, same divergence."""
    idx = teacher.double().topk(k, dim=-1).indices
    return reference(student.gather(-1, idx), teacher.gather(-1, idx), kind, temperature, labels=labels)


def make_inputs(seed=0, scale=2.0, shape=(B, T, V)):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, generator=g) * scale).requires_grad_()
    teacher = torch.randn(*shape, generator=g) * scale
    labels = torch.randint(0, V, shape[:-1], generator=g)
    labels.view(-1)[:5] = IGNORE  # a padded prefix
    labels.view(-1)[-3:] = IGNORE  # a padded suffix
    return student, teacher, labels


def value_and_grad(student, teacher, **kwargs):
    student = student.detach().requires_grad_()
    loss = kd_loss(student, teacher, **kwargs)
    loss.backward()
    return loss.detach(), student.grad


def reference_value_and_grad(fn, student, *args, **kwargs):
    student64 = student.detach().double().requires_grad_()
    loss = fn(student64, *args, **kwargs)
    loss.backward()
    return loss.detach(), student64.grad


def assert_matches_reference(actual, expected):
    # fp32 rounding error scales with the loss (up to ~4e-7 relative here, a few ulp), so values above 1
    # are compared relatively: |actual - expected| <= 1e-6 * max(1, |expected|).
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=1e-6)


def assert_grads_match(actual, expected):
    # Gradient entries are O(1e-2); the fp32 error is below 1e-7 absolute.
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-7)


# Two fp32 computations of the same loss that differ only in how float sums are grouped (token rows summed per
# chunk, the vocabulary summed in top-k order, the T**2 / count scale applied before or after backward). Which
# grouping rounds how depends on the CPU kernel path (ATEN_CPU_CAPABILITY default / avx2 / avx512), so these
# compare to bounds derived from fp32 rounding, never bit for bit.


def assert_same_sum(actual, expected, n_terms):
    """One fp32 loss whose sums over ``n_terms`` (per-token KLs, or a row's exp terms) are grouped differently:
    within 2 * eps * sqrt(n_terms) relative, the random-walk size of reassociating terms of one sign (measured
    <= 0.3 of it over 40 seeds on all three kernel paths)."""
    torch.testing.assert_close(actual, expected, rtol=2 * EPS * math.sqrt(n_terms), atol=0)


def assert_same_grad(actual, expected):
    """Each gradient entry is a difference of O(max|g|) terms with a sum over the V logits of its row (the
    log_softmax backward), so regrouping moves it by a few eps * sqrt(V) * max|g| absolute, whatever its own size:
    allow 2 * eps * sqrt(V) * max|g| (measured <= 0.5 of it over 40 seeds on all three kernel paths). A dropped,
    misplaced or wrongly scaled chunk is off by O(max|g|), ~1e5 times more."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=2 * EPS * math.sqrt(V) * expected.abs().max().item())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_reference(kind, temperature, masked):
    student, teacher, labels = make_inputs()
    labels = labels if masked else None
    value, grad = value_and_grad(student, teacher, kind=kind, temperature=temperature, labels=labels)
    ref_value, ref_grad = reference_value_and_grad(reference, student, teacher, kind, temperature, labels=labels)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert_matches_reference(value, ref_value)
    assert_grads_match(grad, ref_grad)


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_jsd_beta_matches_reference(beta):
    student, teacher, labels = make_inputs(seed=1)
    value, grad = value_and_grad(student, teacher, kind="jsd", temperature=2.0, beta=beta, labels=labels)
    ref_value, ref_grad = reference_value_and_grad(reference, student, teacher, "jsd", 2.0, beta=beta, labels=labels)
    assert_matches_reference(value, ref_value)
    assert_grads_match(grad, ref_grad)


@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("chunk_size", [1, 5, 32, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind, chunk_size, top_k):
    # N = B * T = 32 tokens: 5 leaves a ragged last chunk, 1000 is a single chunk.
    student, teacher, labels = make_inputs(seed=2)
    common = dict(kind=kind, temperature=2.0, labels=labels, top_k=top_k)
    value, grad = value_and_grad(student, teacher, **common)
    chunked_value, chunked_grad = value_and_grad(student, teacher, chunk_size=chunk_size, **common)
    assert_same_sum(chunked_value, value, n_terms=B * T)  # per-token divergences summed chunk by chunk
    assert_same_grad(chunked_grad, grad)


def test_chunked_without_grad_matches():
    student, teacher, labels = make_inputs(seed=3)
    with torch.no_grad():
        full = kd_loss(student, teacher, kind="jsd", labels=labels)
        chunked = kd_loss(student, teacher, kind="jsd", labels=labels, chunk_size=3)
    assert_same_sum(chunked, full, n_terms=B * T)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_of_full_vocab_equals_full_loss(kind):
    student, teacher, labels = make_inputs(seed=4)
    full_value, full_grad = value_and_grad(student, teacher, kind=kind, temperature=2.0, labels=labels)
    k_value, k_grad = value_and_grad(student, teacher, kind=kind, temperature=2.0, labels=labels, top_k=V)
    # top_k = V gathers the vocabulary in the teacher's descending order: every row's sums over V are regrouped.
    assert_same_sum(k_value, full_value, n_terms=V)
    assert_same_grad(k_grad, full_grad)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_top_k_matches_reference(kind, temperature):
    student, teacher, labels = make_inputs(seed=5)
    value, grad = value_and_grad(student, teacher, kind=kind, temperature=temperature, labels=labels, top_k=5)
    ref_value, ref_grad = reference_value_and_grad(
        reference_topk, student, teacher, 5, kind, temperature, labels=labels
    )
    assert_matches_reference(value, ref_value)
    assert_grads_match(grad, ref_grad)
    assert (grad.count_nonzero(dim=-1) <= 5).all()  # only the teacher's top-k columns get gradient


def test_precomputed_top_k_matches_kd_loss_top_k():
    student, teacher, labels = make_inputs(seed=6)
    values, indices = teacher.topk(9, dim=-1)
    expected = kd_loss(student, teacher, kind="forward_kl", temperature=2.0, labels=labels, top_k=9)
    for idx in (indices, indices.int()):  # a cache may store narrower indices
        got = kd_loss_topk(student, values, idx, kind="forward_kl", temperature=2.0, labels=labels)
        # Exact: kd_loss(top_k=9) is this very call (same topk, same ops, same shapes); int32 indices are widened.
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_jsd_half_is_symmetric(temperature):
    a, b, _ = make_inputs(seed=7)
    ab = kd_loss(a, b, kind="jsd", beta=0.5, temperature=temperature)
    ba = kd_loss(b, a, kind="jsd", beta=0.5, temperature=temperature)
    torch.testing.assert_close(ab, ba, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero(kind):
    student, _, _ = make_inputs(seed=8)
    same = kd_loss(student, student.detach().clone(), kind=kind)
    shifted = kd_loss(student, student.detach() + 3.0, kind=kind)  # softmax is shift-invariant
    assert abs(same.item()) < 1e-7  # exactly 0 for the KLs; jsd rounds through log m
    assert abs(shifted.item()) < 1e-6


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_extreme_beta_is_finite(beta):
    student, teacher, labels = make_inputs(seed=9)
    value, grad = value_and_grad(student, teacher, kind="jsd", beta=beta, labels=labels)
    # With m equal to one of the two distributions, both weighted terms vanish.
    assert value.item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs(kind, chunk_size):
    student, teacher, labels = make_inputs(seed=10)
    s16, t16 = student.detach().bfloat16().requires_grad_(), teacher.bfloat16()
    loss = kd_loss(s16, t16, kind=kind, temperature=2.0, labels=labels, chunk_size=chunk_size)
    loss.backward()
    assert loss.dtype == torch.float32
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad).all()
    # Computed in fp32: the upcast values' loss, up to the regrouped token sum when chunked.
    upcast = kd_loss(s16.detach().float(), t16.float(), kind=kind, temperature=2.0, labels=labels)
    assert_same_sum(loss.detach(), upcast, n_terms=B * T)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_all_ignored_gives_zero(kind, chunk_size, top_k):
    student, teacher, labels = make_inputs(seed=11)
    value, grad = value_and_grad(
        student, teacher, kind=kind, labels=torch.full_like(labels, IGNORE), chunk_size=chunk_size, top_k=top_k
    )
    assert value.item() == 0.0
    assert grad is not None and not grad.isnan().any() and (grad == 0).all()


def test_ignored_tokens_do_not_matter():
    student, teacher, labels = make_inputs(seed=12)
    perturbed = teacher.clone()
    perturbed[labels == IGNORE] = float("nan")  # garbage at padded positions must not leak in
    a = kd_loss(student, teacher, kind="forward_kl", labels=labels)
    b = kd_loss(student, perturbed, kind="forward_kl", labels=labels, chunk_size=6)
    assert_same_sum(b, a, n_terms=B * T)  # NaN anywhere would fail; chunking only regroups the token sum


def test_teacher_gets_no_gradient():
    student, teacher, _ = make_inputs(seed=13)
    teacher.requires_grad_()
    for chunk_size in (None, 5):
        kd_loss(student, teacher, kind="jsd", chunk_size=chunk_size).backward()
    assert teacher.grad is None and student.grad is not None


def test_flat_token_shape():
    student, teacher, labels = make_inputs(seed=14, shape=(40, V))
    value = kd_loss(student, teacher, kind="reverse_kl", temperature=2.0, labels=labels)
    assert_matches_reference(value.detach(), reference(student, teacher, "reverse_kl", 2.0, labels=labels))


def test_module_matches_function():
    student, teacher, labels = make_inputs(seed=15)
    module = KDLoss(kind="jsd", temperature=2.0, beta=0.3, chunk_size=8, top_k=10)
    expected = kd_loss(student, teacher, kind="jsd", temperature=2.0, beta=0.3, labels=labels, chunk_size=8, top_k=10)
    torch.testing.assert_close(module(student, teacher, labels), expected)


def test_bad_arguments_raise():
    student, teacher, _ = make_inputs()
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        kd_loss(student, teacher, kind="kl")
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        KDLoss(kind="mse")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, teacher, kind="forward_kl", temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        kd_loss(student, teacher, kind="forward_kl", top_k=V + 1)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(student, teacher[..., :-1], kind="forward_kl")


@pytest.mark.parametrize("top_k", [None, 7])
def test_chunked_saves_only_a_gradient_buffer(top_k):
    student, teacher, labels = make_inputs(seed=16)
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = kd_loss(student, teacher, kind="jsd", labels=labels, chunk_size=4, top_k=top_k)
    alive = sum(ref().numel() for ref in saved if ref() is not None)
    # Per-chunk graphs are gone; what backward keeps is one student-shaped gradient (plus scalars),
    # not [tokens x V] fp32 distributions.
    assert alive <= student.numel() + 2
    loss.backward()
