"""Sequence parallelism (SP): activations between blocks are split along the sequence over the TP
group, gathered before the mixer and the MLP and reduce-scattered after them.

megatron-core's own SP helpers allocate on torch.cuda.current_device() and use reduce_scatter_tensor,
which gloo lacks, so they cannot run in CPU CI; these run on both (NCCL: the fused collectives; gloo:
list all-gather, all-reduce + slice). The megatron layers therefore run with sequence_parallel off,
and layers.py puts these functions around them. Activations are [B, T, D]; the sequence dimension is 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from prism_megatron.process_groups import tp_group, tp_rank, tp_size

SEQ_DIM = 1


def _all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    group, world = tp_group(), tp_size()
    x = x.movedim(dim, 0).contiguous()
    if dist.get_backend(group) == "nccl":
        out = x.new_empty((world * x.shape[0],) + x.shape[1:])
        dist.all_gather_into_tensor(out, x, group=group)
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        out = torch.cat(parts)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    group, world = tp_group(), tp_size()
    x = x.movedim(dim, 0).contiguous()
    if dist.get_backend(group) == "nccl":
        out = x.new_empty((x.shape[0] // world,) + x.shape[1:])
        dist.reduce_scatter_tensor(out, x, group=group)
    else:
        x = x.clone()  # all_reduce works in place; x may still share memory with the input
        dist.all_reduce(x, group=group)
        out = x.chunk(world)[tp_rank()].clone()
    return out.movedim(0, dim)


def _local_slice(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.chunk(tp_size(), dim)[tp_rank()].contiguous()


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM)


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM)


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _local_slice(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM)


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """[B, T/tp, ...] -> [B, T, ...]; the backward sums the TP ranks' gradients and keeps this rank's part."""
    return _GatherSequence.apply(x)


def reduce_scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    """Partial sums [B, T, ...] -> this rank's part of their sum [B, T/tp, ...]."""
    return _ReduceScatterSequence.apply(x)


def scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    """A tensor replicated over TP [B, T, ...] -> this rank's part [B, T/tp, ...]."""
    return _ScatterSequence.apply(x)
