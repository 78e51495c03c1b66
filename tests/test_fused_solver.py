"""The Triton pass of the prism solver (kernels/solver) against the PyTorch code it replaces on CUDA
(kernels/solver/naive.py): outputs and every input's gradient, float64 under the interpreter on the
CPU, bf16 on the GPU."""
from __future__ import annotations

import pytest
import torch

from prism_megatron.kernels.solver.prism_steps import prism_steps
from prism_megatron.kernels.solver.naive import prism_outputs

# tokens N, heads H, L, V, K, columns of alignment padding, key_norm, strengths S from the anchor (L, or
# L - 1 where b^1 comes from x), r^1 = v - u (else v)
CASES = [
    (5, 2, 3, 8, 4, 3, True, 3, True),
    (70, 3, 2, 6, 5, 0, True, 2, True),  # three blocks of tokens; head sizes not a power of two
    (33, 1, 1, 16, 8, 7, True, 1, True),  # L = 1: no extra keys
    (9, 2, 4, 4, 8, 1, False, 4, True),
    (11, 2, 3, 8, 4, 2, True, 2, False),  # the options of issue 31: b^1 from x, r^1 = v
    (6, 1, 1, 16, 8, 3, False, 0, False),  # L = 1 with b^1 from x: no strengths from the anchor
]


def _inputs(N, H, L, V, K, pad, S, subtract_anchor, dtype, device):
    gen = torch.Generator().manual_seed(N * H + L)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    projection = draw(N, H, L * V + (L - 1) * K + S + pad)
    # v and u are slices of one wider tensor, as the mixer passes its parts of the convolution.
    conv = draw(N, H * (2 * V + 3))
    v, u = conv[:, : H * V].view(N, H, V), conv[:, H * V + 3: H * (2 * V) + 3].view(N, H, V)
    return projection, draw(H, L, V), draw(H, S), v, u if subtract_anchor else None


def _run(fn, inputs, K, key_norm, cotangent_dtype=torch.float64):
    """fn's outputs and every input's gradient for a loss whose gradients with respect to the outputs
    (the cotangents) are drawn in cotangent_dtype: the bf16 kernel and the float64 reference it is
    checked against then get the same ones, and differ only by what they compute."""
    inputs = [x if x is None else x.detach().clone().requires_grad_() for x in inputs]
    outputs = fn(*inputs, K, key_norm)
    gen = torch.Generator().manual_seed(7)
    loss = sum((y.double() * torch.randn(y.shape, generator=gen).to(cotangent_dtype).double().to(y.device)).sum()
               for y in outputs if y is not None)
    loss.backward()
    return [y for y in outputs if y is not None] + [x.grad for x in inputs if x is not None]


NAMES = ["d", "kx", "beta", "dprojection", "dgain_bias", "dstrength_bias", "dv", "du"]


def _names(L, subtract_anchor):
    return [n for n in NAMES if (n != "kx" or L > 1) and (n != "du" or subtract_anchor)]


@pytest.mark.parametrize("N, H, L, V, K, pad, key_norm, S, subtract_anchor", CASES)
def test_matches_reference_float64(N, H, L, V, K, pad, key_norm, S, subtract_anchor):
    inputs = _inputs(N, H, L, V, K, pad, S, subtract_anchor, torch.float64, "cpu")
    got, ref = _run(prism_steps, inputs, K, key_norm), _run(prism_outputs, inputs, K, key_norm)
    names = _names(L, subtract_anchor)
    assert len(got) == len(ref) == len(names)
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("N, H, L, V, K, pad, key_norm, S, subtract_anchor",
                         CASES + [(16384, 16, 3, 128, 128, 5, True, 3, True)])
def test_matches_reference_bfloat16_gpu(N, H, L, V, K, pad, key_norm, S, subtract_anchor):
    """bf16 on the GPU: within bf16 rounding of the float64 reference (the kernel computes in float32,
    the PyTorch code rounds after every step)."""
    inputs = _inputs(N, H, L, V, K, pad, S, subtract_anchor, torch.bfloat16, "cuda")
    exact = _run(prism_outputs, [x if x is None else x.double().cpu() for x in inputs], K, key_norm, torch.bfloat16)
    got = _run(prism_steps, inputs, K, key_norm, torch.bfloat16)
    names = _names(L, subtract_anchor)
    for name, a, b in zip(names, got, exact):
        # Each output is rounded once to bf16 (a relative error up to 2^-9); the biases' gradients are
        # sums over all tokens of such rounded terms, so their error scales with the sum's size.
        scale = b.abs().max().item() if name in ("dgain_bias", "dstrength_bias") else 1.0
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-2 * scale, rtol=1e-2, msg=name)
