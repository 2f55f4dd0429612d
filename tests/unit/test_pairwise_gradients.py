"""PairwiseGradients: micro-batch gradients summed as a balanced tree, bit for bit."""

import pytest
import torch

from parallel.collectives import PairwiseGradients


def grads_of(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1000, generator=generator) * 10 ** (i % 3) for i in range(n)]


@pytest.mark.parametrize(
    "n, tree",
    [
        (1, lambda g: g[0]),
        (2, lambda g: g[0] + g[1]),
        (3, lambda g: (g[0] + g[1]) + g[2]),
        (4, lambda g: (g[0] + g[1]) + (g[2] + g[3])),
        (8, lambda g: ((g[0] + g[1]) + (g[2] + g[3])) + ((g[4] + g[5]) + (g[6] + g[7]))),
    ],
)
def test_the_sum_is_the_balanced_tree(n, tree):
    param = torch.nn.Parameter(torch.zeros(1000))
    pairwise = PairwiseGradients([param])
    grads = grads_of(n)
    for grad in grads:
        param.grad = grad.clone()  # what one micro-batch's backward leaves in .grad
        pairwise.push()
        assert param.grad is None
    pairwise.finish()
    assert torch.equal(param.grad, tree(grads))


def test_differs_from_the_running_sum_somewhere():
    """The point of it: for 4 micro-batches the order changes some float32 sums."""
    g = grads_of(4, seed=1)
    assert not torch.equal((g[0] + g[1]) + (g[2] + g[3]), ((g[0] + g[1]) + g[2]) + g[3])


def test_a_parameter_without_gradients_keeps_none_and_a_late_one_counts():
    used, unused, late = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    pairwise = PairwiseGradients([used, unused, late])
    for micro in range(2):
        used.grad = torch.ones(3)
        late.grad = torch.ones(3) if micro == 1 else None
        pairwise.push()
    pairwise.finish()
    assert torch.equal(used.grad, torch.full((3,), 2.0)) and unused.grad is None
    assert torch.equal(late.grad, torch.ones(3))
