"""The LM head's GEMM and the vocab-parallel cross-entropy in one autograd function, over chunks of
tokens, so that neither the logits nor their float32 copy exist for the whole batch.

    losses = linear_cross_entropy(x, weight, labels, vocab_size, tp_group, tp_rank, tp_size)  # [N] float32

x [N, D] is the final hidden state (gathered over TP as the LM head's input is), weight [V/TP, D]
this rank's rows of the (padded) vocabulary, labels [N] global token ids; tp_group, tp_rank and
tp_size the tensor-parallel group the vocabulary is split over and this rank's place in it (None, 0,
1: not split). Per chunk the logits are one GEMM in x's dtype, then float32 (float64 stays float64):
padded vocabulary rows masked to -inf, the max, the sum of exponentials and the label's logit each
summed over TP (three all-reduces of [chunk] values, as megatron-core's vocab_parallel_cross_entropy
does for the whole batch). The forward keeps only the per-token log-sum-exp; the backward recomputes
each chunk's logits, forms softmax - onehot in float32 and takes the two GEMMs in x's dtype, as
autograd through `lm_head(x).float()` does. The reference is exactly that: prism_megatron.model's
logits path followed by megatron-core's vocab_parallel_cross_entropy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from prism_megatron.kernels.fused.fusable import upcast

# float32 logits per chunk: 2^26 values (256 MiB; 2048 tokens of a 32K vocabulary).
LOGITS_PER_CHUNK = 1 << 26


class _VocabSplit:
    """The tensor-parallel group the vocabulary is split over, and this rank's place in it."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def all_reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x


class _ChunkLogits:
    """One chunk's float32 logits with the padded vocabulary masked, and where its labels lie."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                 split: _VocabSplit):
        local = weight.shape[0]
        start = split.rank * local
        self.logits = upcast(x @ weight.T)
        if start + local > vocab_size:
            self.logits[:, max(0, vocab_size - start):] = float("-inf")
        target = labels - start
        self.on_rank = (target >= 0) & (target < local)
        self.target = target.clamp(0, local - 1)
        self.split = split

    def label_logit(self) -> torch.Tensor:
        picked = self.logits.gather(1, self.target[:, None])[:, 0]
        return self.split.all_reduce(torch.where(self.on_rank, picked, 0.0), dist.ReduceOp.SUM)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, vocab_size, split, chunk_tokens):
        losses = x.new_empty(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
        lse = torch.empty_like(losses)
        for s in range(0, x.shape[0], chunk_tokens):
            e = s + chunk_tokens
            chunk = _ChunkLogits(x[s:e], weight, labels[s:e], vocab_size, split)
            peak = split.all_reduce(chunk.logits.max(-1).values, dist.ReduceOp.MAX)
            sum_exp = split.all_reduce((chunk.logits - peak[:, None]).exp().sum(-1), dist.ReduceOp.SUM)
            lse[s:e] = peak + sum_exp.log()
            losses[s:e] = lse[s:e] - chunk.label_logit()
        ctx.save_for_backward(x, weight, labels, lse)
        ctx.vocab_size, ctx.split, ctx.chunk_tokens = vocab_size, split, chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x, weight, labels, lse = ctx.saved_tensors
        dx = torch.empty_like(x)
        dweight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for s in range(0, x.shape[0], ctx.chunk_tokens):
            e = s + ctx.chunk_tokens
            chunk = _ChunkLogits(x[s:e], weight, labels[s:e], ctx.vocab_size, ctx.split)
            grad = (chunk.logits - lse[s:e, None]).exp_()
            rows = torch.arange(grad.shape[0], device=grad.device)
            grad[rows, chunk.target] -= chunk.on_rank.to(grad.dtype)
            grad = (grad * grad_losses[s:e, None]).to(x.dtype)
            dx[s:e] = grad @ weight
            dweight += grad.T @ x[s:e]
        return dx, dweight.to(weight.dtype), None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         tp_group: dist.ProcessGroup | None = None, tp_rank: int = 0, tp_size: int = 1,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy [N] (at least float32) of the logits x @ weight.T over the vocabulary split over
    the tp_size ranks of tp_group (this one its tp_rank-th part), without the whole batch's logits;
    chunk_tokens tokens at a time (default: LOGITS_PER_CHUNK float32 logits a chunk)."""
    if chunk_tokens is None:
        chunk_tokens = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    return LinearCrossEntropy.apply(x, weight, labels, vocab_size, _VocabSplit(tp_group, tp_rank, tp_size),
                                    chunk_tokens)
