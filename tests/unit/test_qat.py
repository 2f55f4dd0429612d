"""QAT through torchao: fake-quant numerics, toggling, names, specs and SQNR."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.compress import qat
from trainer.models import build

SMALLEST_NORMAL = torch.finfo(torch.float32).smallest_normal
SMALLEST_NORMAL_FP16 = torch.finfo(torch.float16).smallest_normal


def small_gpt() -> nn.Module:
    torch.manual_seed(0)
    return build("gpt", vocab_size=65, n_layer=2, n_head=2, n_embd=64, block_size=32)


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def reference_weight_fake_quant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """torchao's symmetric scheme with fp16 scales: scale = max|w| / ((qmax - qmin) / 2), at least
    the smallest normal fp16, rounded to fp16 (its reciprocal taken in fp16); zero point 0."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    groups = w.reshape(w.shape[0], -1, group)
    scale = (groups.abs().amax(dim=-1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=SMALLEST_NORMAL_FP16).half()
    q = torch.clamp(torch.round(groups * (1.0 / scale)), qmin, qmax)
    return (q * scale).reshape(w.shape)


def reference_activation_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """torchao's int8 asymmetric per-token scheme (range always includes 0)."""
    qmin, qmax = -128, 127
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=SMALLEST_NORMAL)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def prepared_linear(bits: int, group: int, act_bits: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    qat.prepare(model, ["0"], weight_bits=bits, group_size=group, act_bits=act_bits)
    qat.set_enabled(model, True)
    return model


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 16)])
def test_weight_fake_quant_matches_reference(bits, group):
    model = prepared_linear(bits, group, act_bits=0)
    linear = model[0]
    expected = reference_weight_fake_quant(linear.weight.detach(), bits, group)
    # Bit for bit: the reference repeats torchao's elementwise formula (amax, divide, clamp, fp16 cast, round,
    # multiply), each op correctly rounded on every kernel path; no sum is involved, so nothing can reassociate.
    assert torch.equal(qat.fake_quantize_weight(linear).detach(), expected)
    codes, scale = qat.quantize_weight(linear.weight.detach(), bits, group)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16
    assert -(2 ** (bits - 1)) <= codes.min() and codes.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(qat.dequantize_weight(codes, scale), expected)
    x = torch.randn(5, 64)
    assert torch.equal(model(x), F.linear(x, expected, linear.bias))  # the module's forward: this F.linear, same shapes


def test_int8_activation_fake_quant_matches_reference():
    model = prepared_linear(8, 64, act_bits=8)
    linear = model[0]
    x = torch.randn(2, 7, 64)
    w = reference_weight_fake_quant(linear.weight.detach(), 8, 64)
    expected = F.linear(reference_activation_fake_quant(x), w, linear.bias)
    assert torch.equal(model(x), expected)  # elementwise formulas as above, then the same F.linear on the same shapes


def test_prepare_keeps_names_and_starts_disabled():
    model = small_gpt()
    reference = copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    qat.prepare(model, block_linears(model), weight_bits=4, group_size=32, act_bits=8)
    assert dict(model.named_parameters()) == params_before  # same Parameter objects, same names
    assert list(model.state_dict()) == keys_before
    x = torch.randint(0, 65, (2, 32))
    assert torch.equal(model(x), reference(x))  # disabled = float path exactly
    qat.set_enabled(model, True)
    assert not torch.equal(model(x), reference(x))
    qat.set_enabled(model, False)
    assert torch.equal(model(x), reference(x))


def test_straight_through_gradients_reach_weights():
    model = small_gpt()
    qat.prepare(model, block_linears(model), weight_bits=4, group_size=32, act_bits=8)
    qat.set_enabled(model, True)
    model(torch.randint(0, 65, (2, 32))).square().mean().backward()
    assert model.blocks["0"].mlp.fc.weight.grad.abs().sum() > 0


def test_specs_and_bits():
    model = small_gpt()
    qat.prepare(model, ["blocks.0.mlp.fc"], weight_bits=8, group_size=32, act_bits=8)
    qat.prepare(model, ["blocks.0.mlp.proj"], weight_bits=4, group_size=32, act_bits=0)
    fc, proj, qkv = model.blocks["0"].mlp.fc, model.blocks["0"].mlp.proj, model.blocks["0"].attn.qkv
    assert qat.is_quantized(fc) and qat.is_quantized(proj) and not qat.is_quantized(qkv)
    assert qat.quant_spec(fc) == {"weight_bits": 8, "group_size": 64, "act_bits": 8}
    assert qat.quant_spec(proj) == {"weight_bits": 4, "group_size": 32, "act_bits": 0}
    assert [qat.module_bits(m) for m in (fc, proj, qkv)] == [8, 4, 32]


@pytest.mark.parametrize(
    "names,message",
    [
        (["head"], "tied"),
        (["ln_f"], "only nn.Linear and nn.Embedding"),
        (["tok_emb"], "tied to head"),
        (["blocks.9.mlp.fc"], "no such module"),
        (["blocks.0.mlp.proj"], "multiple of group_size"),
    ],
)
def test_prepare_rejects_bad_targets(names, message):
    model = small_gpt()
    with pytest.raises(ValueError, match=message):
        qat.prepare(model, names, weight_bits=4, group_size=48, act_bits=0)


def test_prepare_twice_is_rejected():
    model = small_gpt()
    qat.prepare(model, ["blocks.0.mlp.fc"], weight_bits=8, group_size=32, act_bits=0)
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare(model, ["blocks.0.mlp.fc"], weight_bits=8, group_size=32, act_bits=0)


def test_freeze_ranges_is_a_no_op_for_dynamic_scales():
    model = prepared_linear(4, 16, act_bits=8)
    x = torch.randn(3, 64)
    before = model(x)
    qat.freeze_ranges(model)
    assert torch.equal(model(x), before)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # scales still follow the weight
    assert torch.equal(
        qat.fake_quantize_weight(model[0]).detach(), reference_weight_fake_quant(model[0].weight.detach(), 4, 16)
    )


def test_weight_sqnr_is_finite_and_grows_with_bits():
    sqnr = {}
    for bits in (8, 4):
        model = small_gpt()
        qat.prepare(model, block_linears(model), weight_bits=bits, group_size=32, act_bits=0)
        sqnr[bits] = qat.weight_sqnr_db(model)  # measured whether or not fake-quant is enabled
        assert math.isfinite(sqnr[bits])
    assert sqnr[8] > sqnr[4] + 10
    assert qat.weight_sqnr_db(small_gpt()) == math.inf


# ----------------------------------------------------------------------------- embeddings and the tied head


def prepared_with_embeddings(bits: int = 8, group: int = 32) -> nn.Module:
    model = small_gpt()
    qat.prepare(
        model, [*block_linears(model), "tok_emb", "pos_emb", "head"], weight_bits=bits, group_size=group, act_bits=8
    )
    qat.set_enabled(model, True)
    return model


def test_prepare_keeps_the_tie_names_and_state_keys():
    model = small_gpt()
    params_before = dict(model.named_parameters(remove_duplicate=False))
    keys_before = list(model.state_dict())
    qat.prepare(model, ["tok_emb", "pos_emb", "head"], weight_bits=8, group_size=32, act_bits=8)
    assert model.head.weight is model.tok_emb.weight
    assert dict(model.named_parameters(remove_duplicate=False)) == params_before
    assert list(model.state_dict()) == keys_before
    assert model.head.weight_fake_quantizer is model.tok_emb.weight_fake_quantizer  # one quantizer, one tensor
    assert model.head.activation_fake_quantizer is None  # the head is weight-only
    assert (
        qat.quant_spec(model.head)
        == qat.quant_spec(model.tok_emb)
        == {"weight_bits": 8, "group_size": 64, "act_bits": 0}
    )


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 16)])
def test_embedding_and_head_fake_quant_equal_quantize_then_dequantize(bits, group):
    model = prepared_with_embeddings(bits, group)
    idx = torch.randint(0, 32, (2, 32))  # valid rows of both tables
    for name in ("tok_emb", "pos_emb"):
        weight = model.get_submodule(name).weight.detach()
        table = qat.dequantize_weight(*qat.quantize_weight(weight, bits, group))
        assert torch.equal(table, reference_weight_fake_quant(weight, bits, group))
        assert torch.equal(qat.fake_quantize_weight(model.get_submodule(name)).detach(), table)
        assert torch.equal(model.get_submodule(name)(idx), F.embedding(idx, table))
    table = qat.dequantize_weight(*qat.quantize_weight(model.tok_emb.weight.detach(), bits, group))
    features = torch.randn(2, 5, 64)
    assert torch.equal(model.head(features), F.linear(features, table))


def test_disabled_embeddings_are_exact_and_gradients_reach_the_tied_weight():
    model = prepared_with_embeddings()
    reference = small_gpt()
    x = torch.randint(0, 65, (2, 32))
    qat.set_enabled(model, False)
    assert torch.equal(model(x), reference(x))
    qat.set_enabled(model, True)
    assert not torch.equal(model(x), reference(x))
    model(x).square().mean().backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0 and model.pos_emb.weight.grad.abs().sum() > 0


def test_pruned_rows_quantize_to_zero_without_nan():
    weight = torch.randn(4, 64)
    weight[1] = 0.0
    codes, scale = qat.quantize_weight(weight, 8, 64)
    assert scale[1].item() == SMALLEST_NORMAL_FP16 and not codes[1].any()
    assert torch.isfinite(qat.dequantize_weight(codes, scale)).all()


def test_sqnr_counts_the_shared_weight_once():
    model = small_gpt()
    qat.prepare(model, ["tok_emb", "head"], weight_bits=8, group_size=32, act_bits=0)
    weight = model.tok_emb.weight.detach()
    error = weight - qat.dequantize_weight(*qat.quantize_weight(weight, 8, 64))
    # The same fp32 sums of the same tensors as weight_sqnr_db; only the ratio is rounded (fp32 here, fp64 there):
    # <= 4.34 * 6e-8 dB, far under pytest.approx's 1e-6 relative.
    assert qat.weight_sqnr_db(model) == pytest.approx(10 * math.log10(weight.square().sum() / error.square().sum()))
