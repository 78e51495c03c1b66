"""The chunked linear cross-entropy against the logits path it replaces: the LM head's GEMM, padded
vocabulary masked to -inf, megatron-core's vocab_parallel_cross_entropy on float32 logits. (Under
TP and SP it runs inside the model in tests/test_tensor_parallel.py, against TP=1.)"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from prism_megatron.kernels.fused.linear_cross_entropy import even_chunk_tokens, linear_cross_entropy


# Rank 0 of 1 (the model's TP layers need megatron-core's process groups).
pytestmark = pytest.mark.usefixtures("single_process")


def _reference(x, weight, labels, vocab_size):
    logits = x @ weight.T
    logits = logits.masked_fill(torch.arange(weight.shape[0]) >= vocab_size, float("-inf"))
    if x.dtype == torch.float64:  # megatron's function computes in float32
        return F.cross_entropy(logits, labels, reduction="none")
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


def _loss_and_grads(fn, x, weight, labels, vocab_size, **kwargs):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    losses = fn(x, weight, labels, vocab_size, **kwargs)
    gen = torch.Generator().manual_seed(3)
    (losses * torch.rand(losses.shape, generator=gen, dtype=losses.dtype)).sum().backward()
    return losses, x.grad, weight.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("chunk_tokens, fused", [(None, False), (7, False), (1, False), (7, True)])
def test_matches_logits_path(dtype, tol, chunk_tokens, fused):
    """One chunk, uneven chunks and one token a chunk; 40 of 48 vocabulary rows real (padding); the
    passes over the logits eager and compiled (torch.compile's CPU backend)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, generator=gen, dtype=dtype)
    weight = torch.randn(48, 16, generator=gen, dtype=dtype)
    labels = torch.randint(0, 40, (30,), generator=gen)
    ref = _loss_and_grads(_reference, x, weight, labels, 40)
    got = _loss_and_grads(linear_cross_entropy, x, weight, labels, 40, chunk_tokens=chunk_tokens, fused=fused)
    for name, a, b in zip(("loss", "dx", "dweight"), got, ref):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)
    assert torch.all(got[2][40:] == 0)


@pytest.mark.parametrize("fused", [False, True])
def test_bfloat16_within_rounding(fused):
    """bf16 inputs: the GEMMs in bf16 and the softmax in float32, as the logits path does."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 32, generator=gen).bfloat16()
    weight = (0.1 * torch.randn(64, 32, generator=gen)).bfloat16()
    labels = torch.randint(0, 64, (20,), generator=gen)
    ref = _loss_and_grads(_reference, x, weight, labels, 64)
    got = _loss_and_grads(linear_cross_entropy, x, weight, labels, 64, chunk_tokens=8, fused=fused)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1.6e-2)


def test_default_chunks_are_even():
    """16,384 tokens of a 32,000-row vocabulary: 8 chunks of 2,048 tokens (2^26 logits at most each), not
    7 of 2,097 and one of 1,705, which would compile the fused passes for a second shape."""
    assert even_chunk_tokens(16384, 32000) == 2048
    assert even_chunk_tokens(1024, 2048) == 1024  # one chunk
    assert even_chunk_tokens(2049, 1 << 25) == 2  # 2 logits a chunk at most: 1,025 chunks, the last of 1
    assert even_chunk_tokens(0, 32000) == 1
