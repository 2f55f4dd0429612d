"""torchao's dynamic integer fake-quant for the schemes of ``qat.prepare``, one autograd node per call.

torchao's ``IntxFakeQuantizer`` runs generic primitives (``choose_qparams_affine``,
``_fake_quantize_affine``): some forty small ops and a dozen autograd nodes per call, which on a
small CPU model cost more than the matmuls they wrap. ``FusedIntxFakeQuantizer`` is an
``IntxFakeQuantizer`` whose forward computes, for a plain float32 tensor and one of our schemes
(dynamic, integer zero points, int8/int4; weights symmetric per row or per group, activations
asymmetric per token, fp32 or fp16 scales), the very same numbers with about half the ops, in place
where it can, inside one ``torch.autograd.Function``:

- scale and zero point as ``choose_qparams_affine`` computes them: symmetric
  ``max|x| / ((qmax - qmin) / 2)``, zero point 0; asymmetric ``(max(x, 0) - min(x, 0)) / (qmax - qmin)``,
  zero point ``clamp(qmin - round(min(x, 0) / scale))``; scales clamped to ``eps``, then cast;
- ``q = round(x * (1 / scale)) + zero_point``, output ``(clamp(q, qmin, qmax) - zero_point) * scale``;
- gradient: torchao's straight-through estimator, ``grad * scale * (1 / scale)`` where ``q`` lies in
  ``[qmin, qmax]`` and 0 elsewhere (no gradient reaches the scales, as in torchao).

On CPU, where bool masks are slow, a per-token call first checks each token's extremes and skips the
clamp and the mask when nothing can be clamped (the usual case).

Outputs and gradients are bitwise equal to torchao's (tests/unit/test_fused_fake_quant.py). Any
other config or input (another dtype, a DTensor, ...) takes torchao's own forward. Unlike torchao,
the module does not keep the last scale and zero point as attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
from torchao.quantization.qat import IntxFakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, ZeroPointDomain


@dataclass(frozen=True)
class Scheme:
    """What one fused call computes: per token (asymmetric), or symmetric per block of ``group``
    row elements (0 = the whole row); ``eps`` is the smallest scale."""

    per_token: bool
    group: int
    qmin: int
    qmax: int
    eps: float
    scale_dtype: torch.dtype

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether torchao would compute for ``x`` exactly what ``_FakeQuantize`` does."""
        if type(x) not in (torch.Tensor, torch.nn.Parameter) or x.dtype != torch.float32 or x.dim() < 1:
            return False
        if self.per_token:
            return True
        group = self.group or x.shape[-1]
        return x.dim() == 2 and group > 1 and x.shape[-1] % group == 0


def fused_scheme(config: IntxFakeQuantizeConfig) -> Scheme | None:
    """The ``Scheme`` for ``config``, or None when it is not one the fused path reproduces."""
    if not (
        isinstance(config, IntxFakeQuantizeConfig)
        and config.is_dynamic
        and not config.range_learning
        and config.dtype in (torch.int8, torch.int4)  # type: ignore[attr-defined]  # torch's stubs omit int4
        and config.zero_point_domain == ZeroPointDomain.INT
        and config.zero_point_precision == torch.int32
    ):
        return None
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[config.dtype]
    eps = torch.finfo(torch.float32).smallest_normal if config.eps is None else config.eps  # torchao's default
    granularity = config.granularity
    if isinstance(granularity, PerToken) and not config.is_symmetric and config.scale_precision == torch.float32:
        return Scheme(True, 0, qmin, qmax, eps, torch.float32)
    if (
        isinstance(granularity, (PerAxis, PerGroup))
        and config.is_symmetric
        and config.scale_precision in (torch.float32, torch.float16)
    ):
        group = granularity.group_size if isinstance(granularity, PerGroup) else 0
        return Scheme(False, group, qmin, qmax, eps, config.scale_precision)
    return None


class FusedIntxFakeQuantizer(IntxFakeQuantizer):
    """torchao's ``IntxFakeQuantizer`` with a fused forward for our schemes (see the module docstring)."""

    def __init__(self, config: IntxFakeQuantizeConfig):
        super().__init__(config)
        self.scheme = fused_scheme(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.scheme is not None and self.scheme.accepts(x):
            return _FakeQuantize.apply(x, self.scheme)
        return super().forward(x)


class _FakeQuantize(torch.autograd.Function):
    """Dynamic qparams, quantize-dequantize and the straight-through gradient of one tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
        zero_point: torch.Tensor | int  # a float tensor per token, 0 for the symmetric schemes
        if scheme.per_token:
            blocks = x
            scale, zero_point, extremes = _token_qparams(x, scheme)
        else:
            grouped = 0 < scheme.group < x.shape[-1]
            blocks = x.reshape(x.shape[0], -1, scheme.group) if grouped else x  # a row is one block
            scale, zero_point, extremes = _symmetric_scale(blocks, scheme), 0, None
        inverse = scale.reciprocal()
        q = (blocks * inverse).round_()
        in_range = None
        if extremes is not None and _within_range(extremes, inverse, zero_point, scheme):
            out = q.mul_(scale).add_(0.0)  # (q + zero_point - zero_point) * scale: turns -0.0 into 0.0 too
        else:
            q.add_(zero_point)  # adding the zero point, even 0, turns -0.0 into 0.0
            clamped = q.clamp(scheme.qmin, scheme.qmax)
            if ctx.needs_input_grad[0]:
                in_range = clamped == q
            out = (clamped.sub_(zero_point) if scheme.per_token else clamped).mul_(scale)
        ctx.save_for_backward(in_range, scale, inverse)
        ctx.blocks_shape = blocks.shape if blocks is not x else None
        return out if blocks is x else out.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        in_range, scale, inverse = ctx.saved_tensors
        blocks_shape = ctx.blocks_shape
        grad_blocks = (grad if blocks_shape is None else grad.reshape(blocks_shape)).mul(scale).mul_(inverse)
        if in_range is not None:
            grad_blocks = torch.where(in_range, grad_blocks, 0.0)
        return (grad_blocks if blocks_shape is None else grad_blocks.view(grad.shape)), None


def _symmetric_scale(blocks: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Per-block scale ``max|x| / ((qmax - qmin) / 2)``, at least ``eps``, in the scheme's dtype."""
    scale = blocks.abs().amax(dim=-1, keepdim=True).div_((scheme.qmax - scheme.qmin) / 2)
    return scale.clamp_(min=scheme.eps).to(scheme.scale_dtype)


def _token_qparams(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token asymmetric scale and zero point (a float tensor), and each token's ``[min, max]``.

    The extremes let CPU callers skip the clamp and its mask, which are slow there, when no value
    can leave ``[qmin, qmax]``; they are None on other devices, where the check would wait for the device.
    """
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    extremes = torch.cat((lo, hi), dim=-1) if x.is_cpu else None
    lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
    scale = hi.sub_(lo).div_(float(scheme.qmax - scheme.qmin)).clamp_(min=scheme.eps)
    zero_point = (scheme.qmin - lo.div_(scale).round_()).clamp_(scheme.qmin, scheme.qmax)
    return scale, zero_point, extremes


def _within_range(
    extremes: torch.Tensor, inverse: torch.Tensor, zero_point: torch.Tensor | int, scheme: Scheme
) -> bool:
    """Whether every token's quantized extremes lie in ``[qmin, qmax]``: quantizing is monotone, so
    then all its values do. False when an extreme is NaN."""
    q = extremes.mul_(inverse).round_().add_(zero_point)
    return torch.equal(q, q.clamp(scheme.qmin, scheme.qmax))
