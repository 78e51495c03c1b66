"""The model's building blocks that change how autograd keeps activations: LinearOfRecomputed (the
MLP's SwiGLU and the mixer's gated output norm, recomputed in the backward) against plain autograd
through the same functions, in float64."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from prism_megatron.layers import LinearOfRecomputed, gated_rms_norm, swiglu


def _grads(outputs, inputs, seed):
    gen = torch.Generator().manual_seed(seed)
    outputs.backward(torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype))
    return [x.grad for x in inputs]


@pytest.mark.parametrize("name", ["swiglu", "gated_rms_norm"])
def test_linear_of_recomputed_matches_autograd(name):
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, requires_grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)

    if name == "swiglu":
        fn, inputs = functools.partial(swiglu, False), [leaf(2, 5, 12)]
        weight = leaf(7, 6)
    else:  # the gate needs no gradient here: that input's slot stays None
        fn = functools.partial(gated_rms_norm, False, eps=1e-6)
        inputs, weight = [leaf(2, 5, 8), leaf(2, 5, 8, requires_grad=False), leaf(8)], leaf(7, 8)
    expected = _grads(F.linear(fn(*inputs), weight), [weight, *inputs], seed=1)
    for x in [weight, *inputs]:
        x.grad = None
    got = _grads(LinearOfRecomputed.apply(fn, weight, *inputs), [weight, *inputs], seed=1)
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_linear_of_recomputed_with_only_the_weight_trained():
    """No input needs a gradient (a frozen layer below): the weight's gradient alone, no error."""
    gen = torch.Generator().manual_seed(2)
    gate_up = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = functools.partial(swiglu, False)
    LinearOfRecomputed.apply(fn, weight, gate_up).sum().backward()
    expected = torch.ones(4, 7, dtype=torch.float64).T @ fn(gate_up)
    torch.testing.assert_close(weight.grad, expected, atol=1e-12, rtol=1e-12)
