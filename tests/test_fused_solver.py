"""The Triton pass of the prism solver (kernels/solver) against the PyTorch code it replaces on CUDA
(kernels/solver/naive.py): outputs and every input's gradient, float64 under the interpreter on the
CPU, bf16 on the GPU."""
from __future__ import annotations

import pytest
import torch

from prism_megatron.kernels.solver.prism_steps import prism_steps
from prism_megatron.kernels.solver.naive import prism_outputs

CASES = [  # tokens N, heads H, L, V, K, columns of alignment padding, key_norm
    (5, 2, 3, 8, 4, 3, True),
    (70, 3, 2, 6, 5, 0, True),  # three blocks of tokens; head sizes not a power of two
    (33, 1, 1, 16, 8, 7, True),  # L = 1: no extra keys
    (9, 2, 4, 4, 8, 1, False),
]


def _inputs(N, H, L, V, K, pad, dtype, device):
    gen = torch.Generator().manual_seed(N * H + L)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    projection = draw(N, H, L * V + (L - 1) * K + L + pad)
    # v and u are slices of one wider tensor, as the mixer passes its parts of the convolution.
    conv = draw(N, H * (2 * V + 3))
    v, u = conv[:, : H * V].view(N, H, V), conv[:, H * V + 3: H * (2 * V) + 3].view(N, H, V)
    return projection, draw(H, L, V), draw(H, L), v, u


def _run(fn, inputs, K, key_norm, cotangent_dtype=torch.float64):
    """fn's outputs and every input's gradient for a loss whose gradients with respect to the outputs
    (the cotangents) are drawn in cotangent_dtype: the bf16 kernel and the float64 reference it is
    checked against then get the same ones, and differ only by what they compute."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    outputs = fn(*inputs, K, key_norm)
    gen = torch.Generator().manual_seed(7)
    loss = sum((y.double() * torch.randn(y.shape, generator=gen).to(cotangent_dtype).double().to(y.device)).sum()
               for y in outputs if y is not None)
    loss.backward()
    return [y for y in outputs if y is not None] + [x.grad for x in inputs]


NAMES = ["d", "kx", "beta", "dprojection", "dgain_bias", "dstrength_bias", "dv", "du"]


@pytest.mark.parametrize("N, H, L, V, K, pad, key_norm", CASES)
def test_matches_reference_float64(N, H, L, V, K, pad, key_norm):
    inputs = _inputs(N, H, L, V, K, pad, torch.float64, "cpu")
    got, ref = _run(prism_steps, inputs, K, key_norm), _run(prism_outputs, inputs, K, key_norm)
    names = [n for n in NAMES if n != "kx" or L > 1]
    assert len(got) == len(ref) == len(names)
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("N, H, L, V, K, pad, key_norm", CASES + [(16384, 16, 3, 128, 128, 5, True)])
def test_matches_reference_bfloat16_gpu(N, H, L, V, K, pad, key_norm):
    """bf16 on the GPU: within bf16 rounding of the float64 reference (the kernel computes in float32,
    the PyTorch code rounds after every step)."""
    inputs = _inputs(N, H, L, V, K, pad, torch.bfloat16, "cuda")
    exact = _run(prism_outputs, [x.double().cpu() for x in inputs], K, key_norm, torch.bfloat16)
    got = _run(prism_steps, inputs, K, key_norm, torch.bfloat16)
    names = [n for n in NAMES if n != "kx" or L > 1]
    for name, a, b in zip(names, got, exact):
        # Each output is rounded once to bf16 (a relative error up to 2^-9); the biases' gradients are
        # sums over all tokens of such rounded terms, so their error scales with the sum's size.
        scale = b.abs().max().item() if name in ("dgain_bias", "dstrength_bias") else 1.0
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-2 * scale, rtol=1e-2, msg=name)
