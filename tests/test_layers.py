"""The model's building blocks that change how autograd keeps activations or how a GEMM is formed:
LinearOfRecomputed (the MLP's SwiGLU and the mixer's gated output norm, recomputed in the backward)
against plain autograd through the same functions, in float64, and ColumnParallelLinear at widths
that are not a multiple of ALIGN_COLUMNS against F.linear."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from prism_megatron.kernels.fused.fusable import Fusable
from prism_megatron.layers import (ALIGN_COLUMNS, ColumnParallelLinear, LinearOfRecomputed, gated_rms_norm,
                                   megatron_config_for, rms_norm, swiglu)
from prism_megatron.sharding import normal_init


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


def test_compiled_glue_gets_no_parameter_objects():
    """What the GPU test below relies on, checked in CI: the compiled function sees parameters as plain
    tensors (Inductor assumes a parameter's alignment), which still carry the gradient back to them."""
    seen = []
    mul = Fusable(lambda x, w: x * w)
    mul.compiled = lambda *args: seen.extend(args) or mul.eager(*args)
    x, w = torch.randn(3), torch.nn.Parameter(torch.randn(3))
    mul(True, x, w).sum().backward()
    assert not any(isinstance(a, torch.nn.Parameter) for a in seen)
    torch.testing.assert_close(w.grad, x)


@pytest.mark.gpu
def test_fused_ops_take_a_misaligned_parameter_after_an_aligned_one_gpu():
    """DeepSpeed packs the parameters into one flat buffer, so some (those after A_log of 6 or 20 heads)
    are not 16-byte aligned. The compiled RMSNorm, having compiled with an aligned weight, takes a
    misaligned one (the order in which Inductor's kernel faulted, when parameters went in as such)."""
    hidden = 760  # a width no other test compiles for
    x = torch.randn(4, 64, hidden, device="cuda", dtype=torch.bfloat16)
    flat = torch.randn(2 * hidden + 1, device="cuda", dtype=torch.bfloat16)
    aligned, misaligned = torch.nn.Parameter(flat[:hidden]), torch.nn.Parameter(flat[hidden + 1:])
    assert misaligned.data_ptr() % 16
    for weight in (aligned, misaligned):
        torch.testing.assert_close(rms_norm(True, x, weight, 1e-6), rms_norm(False, x, weight, 1e-6))
    torch.cuda.synchronize()


@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("width", [262, 264])
def test_column_parallel_linear_forms_aligned_rows(width):
    """An unaligned width (in_proj's with 6 heads' gates) is formed in rows of a multiple of
    ALIGN_COLUMNS, the fast GEMMs' layout; output and gradients are F.linear's, in float64."""
    layer = ColumnParallelLinear(16, width, megatron_config=megatron_config_for(1, torch.float64),
                                 init=normal_init(1.0), sequence_parallel=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.stride(-2) % ALIGN_COLUMNS == 0
    x_ref, w_ref = x.detach().clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    got, ref = _grads(y, [x, layer.weight], 1), _grads(y_ref, [x_ref, w_ref], 1)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
