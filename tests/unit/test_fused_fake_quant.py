"""The fused fake quantizer against torchao's own IntxFakeQuantizer: bitwise equal outputs and gradients."""

import pytest
import torch
import torch.nn as nn
from torchao.quantization.qat import IntxFakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

from trainer.compress import qat
from trainer.compress.fused_fake_quant import FusedIntxFakeQuantizer, fused_scheme

SMALLEST_NORMAL_FP16 = torch.finfo(torch.float16).smallest_normal


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))  # also tells -0.0 from 0.0


def compare_with_torchao(
    config: IntxFakeQuantizeConfig, x: torch.Tensor, grad: torch.Tensor | None = None
) -> torch.Tensor:
    """Check the fused output and input gradient bitwise against torchao's; return torchao's gradient."""
    fused = FusedIntxFakeQuantizer(config)
    assert fused.scheme is not None and fused.scheme.accepts(x)
    expected_x, actual_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, actual = IntxFakeQuantizer(config)(expected_x), fused(actual_x)
    assert_bitwise_equal(actual, expected)
    grad = torch.randn_like(x) if grad is None else grad
    expected.backward(grad)
    actual.backward(grad)
    assert_bitwise_equal(actual_x.grad, expected_x.grad)
    with torch.no_grad():
        assert_bitwise_equal(fused(x), expected.detach())
    return expected_x.grad


def edge_case_weight(rows: int = 48, cols: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.05
    w[1] = 0.0  # a pruned row
    w[2] *= 1e-4  # max|w| / 127.5 under the fp16 scale floor
    w[3] = -w[3].abs()  # negative only
    w[4] = w[4].abs()  # positive only
    w[5, ::2] = 0.0  # half pruned
    w[6] = 0.02  # constant
    w[7, :] = torch.linspace(-1, 1, cols)  # max|w| attained at both ends
    return w


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 16), (4, 32)])
def test_weight_fake_quant_is_torchao_bit_for_bit(bits, group):
    config = qat.weight_fake_quant_config(bits, group)
    w = edge_case_weight()
    grad = compare_with_torchao(config, w)
    assert (grad == 0).any()  # some values were clamped: the masked gradient path ran
    compare_with_torchao(config, w, grad=torch.randn(1, 64).expand(48, 64))  # a non-contiguous gradient


def test_pruned_rows_get_the_fp16_scale_floor():
    w = edge_case_weight()
    out = FusedIntxFakeQuantizer(qat.weight_fake_quant_config(8, 0))(w)
    assert torch.equal(out[1], torch.zeros(64)) and not out[1].signbit().any()
    assert torch.equal(out[2], torch.round(w[2] / SMALLEST_NORMAL_FP16) * SMALLEST_NORMAL_FP16)


def edge_case_tokens() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64)
    x[0, 0] = 0.0
    x[0, 1] = x[0, 1].abs()  # positive only: zero point at qmin
    x[0, 2] = -x[0, 2].abs()  # negative only: zero point at qmax
    x[0, 3] *= 1e-39  # subnormal values
    x[0, 4] = 3.0  # constant
    x[0, 5, :32] = 0.0
    return x


def boundary_tokens(n: int = 64) -> torch.Tensor:
    """Tokens whose min / scale sits on a rounding boundary, so that some values get clamped."""
    torch.manual_seed(1)
    scale = torch.rand(n, 1) * 0.1 + 0.001
    lo = -(torch.randint(1, 254, (n, 1)).float() + 0.5) * scale
    return torch.cat([lo, lo + 255 * scale, lo + torch.rand(n, 62) * 255 * scale], dim=-1)


def test_activation_fake_quant_is_torchao_bit_for_bit():
    config = qat.activation_fake_quant_config(8)
    compare_with_torchao(config, edge_case_tokens())  # 3-D, nothing clamped
    compare_with_torchao(config, edge_case_tokens()[0])  # 2-D
    compare_with_torchao(config, torch.randn(64))  # a single token
    grad = compare_with_torchao(config, boundary_tokens())
    assert (grad == 0).any()  # some values were clamped: the masked gradient path ran
    mixed = torch.cat([edge_case_tokens().reshape(-1, 64), boundary_tokens()]).reshape(2, -1, 64)
    compare_with_torchao(config, mixed, grad=torch.randn(64).expand(mixed.shape))


def test_other_configs_and_inputs_fall_back_to_torchao():
    assert fused_scheme(IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=False)) is None
    assert fused_scheme(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False, is_dynamic=False)) is None
    assert (
        fused_scheme(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False, scale_precision=torch.float16))
        is None
    )
    config = qat.activation_fake_quant_config(8)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert not FusedIntxFakeQuantizer(config).scheme.accepts(x)
    assert torch.equal(FusedIntxFakeQuantizer(config)(x), IntxFakeQuantizer(config)(x))
    disabled = FusedIntxFakeQuantizer(config)
    disabled.enabled = False
    assert disabled(x) is x


def test_prepare_installs_fused_quantizers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Embedding(10, 64))
    qat.prepare(model, ["0", "1"], weight_bits=8, group_size=32, act_bits=8)
    linear, embedding = model
    for quantizer in (linear.weight_fake_quantizer, linear.activation_fake_quantizer, embedding.weight_fake_quantizer):
        assert type(quantizer) is FusedIntxFakeQuantizer and quantizer.scheme is not None
