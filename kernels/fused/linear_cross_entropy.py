"""The LM head's GEMM and the vocab-parallel cross-entropy in one autograd function, over chunks of
tokens, so that neither the logits nor their float32 copy exist for the whole batch.

    losses = linear_cross_entropy(x, weight, labels, vocab_size, tp_group, tp_rank, tp_size)  # [N] float32

x [N, D] is the final hidden state (gathered over TP as the LM head's input is), weight [V/TP, D]
this rank's rows of the (padded) vocabulary, labels [N] global token ids; tp_group, tp_rank and
tp_size the tensor-parallel group the vocabulary is split over and this rank's place in it (None, 0,
1: not split). Per chunk the logits are one GEMM in x's dtype, padded vocabulary rows masked to -inf,
then in float32 (float64 stays float64): the max, the sum of exponentials and the label's logit each
summed over TP (three all-reduces of [chunk] values, as megatron-core's vocab_parallel_cross_entropy
does for the whole batch). The forward keeps only the per-token log-sum-exp; the backward recomputes
each chunk's logits, forms softmax - onehot in float32 and takes the two GEMMs in x's dtype, as
autograd through `lm_head(x).float()` does. The reference is exactly that: prism_megatron.model's
logits path followed by megatron-core's vocab_parallel_cross_entropy. With `fused`, the float32 passes
over a chunk's logits (the sum of exponentials; softmax - onehot, scaled and cast) are each one
compiled kernel that reads the logits in x's dtype, not a float32 copy of them pass by pass.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from prism_megatron.kernels.fused.fusable import Fusable, upcast

# Logits per chunk: 2^26 values (256 MiB in float32; 2048 tokens of a 32K vocabulary).
LOGITS_PER_CHUNK = 1 << 26


class _VocabSplit:
    """The tensor-parallel group the vocabulary is split over, and this rank's place in it."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def all_reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x


@Fusable
def sum_exp(logits: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """sum over the vocabulary of exp(logit - peak), in float32."""
    return (upcast(logits) - peak[:, None]).exp().sum(-1)


@Fusable
def logits_grad(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, on_rank: torch.Tensor,
                grad_losses: torch.Tensor) -> torch.Tensor:
    """(softmax - onehot(target)) * grad_losses in float32, in the logits' dtype."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    onehot = ((columns == target[:, None]) & on_rank[:, None]).to(lse.dtype)
    return (((upcast(logits) - lse[:, None]).exp() - onehot) * grad_losses[:, None]).to(logits.dtype)


class _ChunkLogits:
    """One chunk's logits in x's dtype with the padded vocabulary masked, and where its labels lie."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                 split: _VocabSplit):
        local = weight.shape[0]
        start = split.rank * local
        self.logits = x @ weight.T
        if start + local > vocab_size:
            self.logits[:, max(0, vocab_size - start):] = float("-inf")
        target = labels - start
        self.on_rank = (target >= 0) & (target < local)
        self.target = target.clamp(0, local - 1)
        self.split = split

    def peak(self) -> torch.Tensor:
        return self.split.all_reduce(upcast(self.logits.max(-1).values), dist.ReduceOp.MAX)

    def label_logit(self) -> torch.Tensor:
        picked = upcast(self.logits.gather(1, self.target[:, None])[:, 0])
        return self.split.all_reduce(torch.where(self.on_rank, picked, 0.0), dist.ReduceOp.SUM)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, vocab_size, split, chunk_tokens, fused):
        losses = x.new_empty(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
        lse = torch.empty_like(losses)
        for s in range(0, x.shape[0], chunk_tokens):
            e = s + chunk_tokens
            chunk = _ChunkLogits(x[s:e], weight, labels[s:e], vocab_size, split)
            peak = chunk.peak()
            total = split.all_reduce(sum_exp(fused, chunk.logits, peak), dist.ReduceOp.SUM)
            lse[s:e] = peak + total.log()
            losses[s:e] = lse[s:e] - chunk.label_logit()
        ctx.save_for_backward(x, weight, labels, lse)
        ctx.vocab_size, ctx.split, ctx.chunk_tokens, ctx.fused = vocab_size, split, chunk_tokens, fused
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x, weight, labels, lse = ctx.saved_tensors
        dx = torch.empty_like(x)
        dweight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for s in range(0, x.shape[0], ctx.chunk_tokens):
            e = s + ctx.chunk_tokens
            chunk = _ChunkLogits(x[s:e], weight, labels[s:e], ctx.vocab_size, ctx.split)
            grad = logits_grad(ctx.fused, chunk.logits, lse[s:e], chunk.target, chunk.on_rank, grad_losses[s:e])
            dx[s:e] = grad @ weight
            dweight += grad.T @ x[s:e]
        return dx, dweight.to(weight.dtype), None, None, None, None, None


def even_chunk_tokens(n_tokens: int, local_vocab: int) -> int:
    """Tokens a chunk when n_tokens are split into equal chunks of at most LOGITS_PER_CHUNK logits each (the
    last one may be shorter by less than the number of chunks). Equal chunks give the compiled passes one
    shape, not a second for a shorter last chunk, and split a power-of-two batch into GEMMs of a
    power-of-two height."""
    most = max(1, LOGITS_PER_CHUNK // local_vocab)
    chunks = max(1, -(-n_tokens // most))
    return max(1, -(-n_tokens // chunks))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         tp_group: dist.ProcessGroup | None = None, tp_rank: int = 0, tp_size: int = 1,
                         chunk_tokens: int | None = None, fused: bool = False) -> torch.Tensor:
    """Per-token cross-entropy [N] (at least float32) of the logits x @ weight.T over the vocabulary split over
    the tp_size ranks of tp_group (this one its tp_rank-th part), without the whole batch's logits;
    chunk_tokens tokens at a time (default: even_chunk_tokens); fused: the passes over a chunk's logits
    through torch.compile."""
    if chunk_tokens is None:
        chunk_tokens = even_chunk_tokens(x.shape[0], weight.shape[0])
    return LinearCrossEntropy.apply(x, weight, labels, vocab_size, _VocabSplit(tp_group, tp_rank, tp_size),
                                    chunk_tokens, fused)
