"""The Triton short convolution (kernels/conv) against the PyTorch one it replaces on CUDA
(kernels/conv/naive.py: causal_depthwise_conv, with SiLU on the leading channels): forward and gradients, float64
under the interpreter on the CPU, bf16 on the GPU."""
from __future__ import annotations

import pytest
import torch

from prism_megatron.kernels.conv.causal_conv import causal_conv
from prism_megatron.kernels.conv import short_conv
from prism_megatron.model import token_positions


def reference(x, weight, position, silu_channels):
    return short_conv(False, x, weight, position, silu_channels)


def _run(fn, x, weight, position, silu_channels):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = fn(x, weight, position, silu_channels)
    gen = torch.Generator().manual_seed(5)
    (y.float() * torch.randn(y.shape, generator=gen).to(y.device)).sum().backward()
    return y, x.grad, weight.grad


def _inputs(B, T, C, W, cu_seqlens, dtype, device, strided):
    gen = torch.Generator().manual_seed(B * T + C)
    # A slice of a wider tensor, as the mixer passes its part of the in_proj output.
    wide = torch.randn(B, T, C + 3 * strided, generator=gen, dtype=torch.float64)
    x = wide.to(device=device, dtype=dtype)[..., :C]
    weight = torch.randn(C, W, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, weight, token_positions(B, T, cu_seqlens, device)


CASES = [  # B, T, C, W, cu_seqlens over the B*T tokens, strided, SiLU channels
    (2, 9, 5, 4, None, True, 2),
    (1, 70, 130, 4, torch.tensor([0, 1, 3, 40, 70]), True, 129),  # several blocks of tokens and of channels
    (2, 3, 6, 4, None, False, 6),  # shorter than the window
    (1, 20, 7, 2, torch.tensor([0, 11, 20]), False, 0),
]


@pytest.mark.parametrize("B, T, C, W, cu_seqlens, strided, silu_channels", CASES)
def test_matches_reference_float64(B, T, C, W, cu_seqlens, strided, silu_channels):
    x, weight, position = _inputs(B, T, C, W, cu_seqlens, torch.float64, "cpu", strided)
    ref = _run(reference, x, weight, position, silu_channels)
    got = _run(causal_conv, x, weight, position, silu_channels)
    for name, a, b in zip(("y", "dx", "dweight"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("B, T, C, W, cu_seqlens, strided, silu_channels",
                         CASES + [(2, 4096, 8192 + 64, 4, None, True, 6144)])
def test_matches_reference_bfloat16_gpu(B, T, C, W, cu_seqlens, strided, silu_channels):
    """bf16 on the GPU: within bf16 rounding of the float64 reference (the kernel sums in float32,
    the PyTorch code rounds after every tap)."""
    x, weight, position = _inputs(B, T, C, W, cu_seqlens, torch.bfloat16, "cuda", strided)
    exact = _run(reference, x.double().cpu(), weight.double().cpu(), position.cpu(), silu_channels)
    got = _run(causal_conv, x, weight, position, silu_channels)
    for name, a, b in zip(("y", "dx", "dweight"), got, exact):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double().cpu(), b, atol=2e-2 * scale, rtol=1e-2, msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("split", [7, 10], ids=["tail-longer-than-halo", "tail-shorter-than-halo"])
def test_halo_continues_the_rows(fused, split):
    """A row's tail after its halo (the W-1 inputs before it) gives the tail of the whole row's output,
    and the same gradients of the inputs and weights, as the previous context-parallel rank's inputs (or
    a decoding cache) continue a sequence; a document that starts in the tail (row 0, token 9) does not
    see the halo."""
    W = 4
    x, weight, position = _inputs(2, 12, 5, W, torch.tensor([0, 9, 12, 24]), torch.float64, "cpu", True)
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    probe = torch.randn(2, 12 - split, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = short_conv(fused, x, weight, position, 3)[:, split:]
    expected = (whole, *torch.autograd.grad((whole * probe).sum(), (x, weight)))
    tail = short_conv(fused, x[:, split:], weight, position[:, split:], 3, halo=x[:, split - W + 1:split])
    got = (tail, *torch.autograd.grad((tail * probe).sum(), (x, weight)))
    for name, a, b in zip(("y", "dx", "dweight"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
