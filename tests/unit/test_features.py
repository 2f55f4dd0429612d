"""Feature distillation: losses against float64 references, projections, gradients and weighting."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from trainer.distill.features import FeatureDistiller, feature_loss


@dataclass
class Spec:
    student_layer: int
    teacher_layer: int
    loss: str = "mse"
    weight: float = 1.0


def hidden(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def test_mse_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 2.0]])
    assert feature_loss(s, t, "mse").item() == pytest.approx((1 + 4 + 0 + 4) / 4)


def test_cosine_by_hand():
    s = torch.tensor([[1.0, 0.0], [2.0, 2.0], [1.0, -1.0]])
    t = torch.tensor([[0.0, 3.0], [1.0, 1.0], [-1.0, 1.0]])  # orthogonal, parallel, opposite
    assert feature_loss(s, t, "cosine").item() == pytest.approx((1 + 0 + 2) / 3, abs=1e-6)


def test_losses_match_float64_reference():
    s, t = hidden(2, 7, 16, seed=1), hidden(2, 7, 16, seed=2)
    s64, t64 = s.double(), t.double()
    mse = ((s64 - t64) ** 2).mean()
    cos = 1 - (s64 * t64).sum(-1) / (s64.norm(dim=-1) * t64.norm(dim=-1))
    # fp32 against fp64: a mean of 224 squares, and 14 cosines of 16-wide rows, each off by a few eps (~1e-7
    # relative) whatever the kernel path's summation order; 1e-6 relative bounds that (measured <= 0.07 of it).
    torch.testing.assert_close(feature_loss(s, t, "mse").double(), mse, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(feature_loss(s, t, "cosine").double(), cos.mean(), rtol=1e-6, atol=1e-7)


def test_bf16_features_are_computed_in_fp32():
    s, t = hidden(3, 8, seed=3).bfloat16(), hidden(3, 8, seed=4).bfloat16()
    loss = feature_loss(s, t, "mse")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, feature_loss(s.float(), t.float(), "mse"))


def test_bad_feature_loss_raises():
    with pytest.raises(ValueError, match="mse, cosine"):
        feature_loss(hidden(2, 4), hidden(2, 4), "l1")
    with pytest.raises(ValueError, match="mse, cosine"):
        FeatureDistiller([Spec(0, 0, loss="kl")], 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        feature_loss(hidden(2, 4), hidden(2, 5), "mse")


def test_no_projection_when_widths_match():
    distiller = FeatureDistiller([Spec(1, 2), Spec(0, 0, loss="cosine")], student_width=8, teacher_width=8)
    assert all(isinstance(p, nn.Identity) for p in distiller.projections)
    assert list(distiller.parameters()) == []


def test_projection_when_widths_differ_and_it_trains():
    distiller = FeatureDistiller([Spec(1, 3, loss="cosine"), Spec(0, 1)], student_width=8, teacher_width=12)
    for projection in distiller.projections:
        assert isinstance(projection, nn.Linear)
        assert projection.weight.shape == (12, 8) and projection.bias is None
    student = {layer: hidden(2, 5, 8, seed=layer, requires_grad=True) for layer in (0, 1)}
    teacher = {layer: hidden(2, 5, 12, seed=10 + layer, requires_grad=True) for layer in (1, 3)}
    total, parts = distiller(student, teacher)
    total.backward()
    assert set(parts) == {"distill/feat_s1_t3", "distill/feat_s0_t1"}
    for projection in distiller.projections:
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert all(h.grad is not None for h in student.values())
    assert all(h.grad is None for h in teacher.values())  # teacher hidden states are detached


def test_projected_loss_matches_manual_projection():
    distiller = FeatureDistiller([Spec(2, 4)], student_width=6, teacher_width=10)
    s, t = hidden(3, 6, seed=9), hidden(3, 10, seed=10)
    _, parts = distiller({2: s}, {4: t})
    expected = ((s @ distiller.projections[0].weight.T - t) ** 2).mean()
    # matmul here, the Linear's kernel there: the same 6-term dot products, possibly grouped differently, so the
    # default fp32 tolerance (1.3e-6 relative), not bit equality.
    torch.testing.assert_close(parts["distill/feat_s2_t4"], expected)


def test_weights_combine_linearly():
    specs = [Spec(0, 0, "mse", 0.5), Spec(1, 2, "cosine", 2.0), Spec(2, 3, "mse", 0.0)]
    distiller = FeatureDistiller(specs, student_width=8, teacher_width=8)
    student = {i: hidden(4, 8, seed=20 + i) for i in range(3)}
    teacher = {i: hidden(4, 8, seed=30 + i) for i in range(4)}
    total, parts = distiller(student, teacher)
    expected = sum(s.weight * parts[distiller.key(s.student_layer, s.teacher_layer)] for s in specs)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["distill/feat_s0_t0"], feature_loss(student[0], teacher[0], "mse"))
    assert parts["distill/feat_s2_t3"].item() > 0  # reported unweighted even at weight 0

    doubled_specs = [Spec(s.student_layer, s.teacher_layer, s.loss, 2 * s.weight) for s in specs]
    doubled = FeatureDistiller(doubled_specs, 8, 8)
    doubled_total, doubled_parts = doubled(student, teacher)
    torch.testing.assert_close(doubled_total, 2 * total)
    assert doubled_parts.keys() == parts.keys()


def test_missing_layer_and_duplicate_pair_raise():
    distiller = FeatureDistiller([Spec(1, 1)], 4, 4)
    with pytest.raises(KeyError, match="student layer 1"):
        distiller({0: hidden(2, 4)}, {1: hidden(2, 4)})
    with pytest.raises(ValueError, match="twice"):
        FeatureDistiller([Spec(1, 1), Spec(1, 1, loss="cosine")], 4, 4)
