"""Process groups, sequence-parallel communication, and how every parameter is split over TP ranks.

The model runs under megatron-core's tensor parallelism: its `parallel_state` owns the process
groups and its TP layers own the column/row/vocab splits. This module adds what DeepSpeed and the
checkpoints need around that:

- `initialize_parallel` / `destroy_parallel`, and `deepspeed_mpu()`, the adapter DeepSpeed's
  `mpu=` takes so that it reduces gradients over the data-parallel group only;
- sequence parallelism (SP): activations between blocks are split along the sequence over the TP
  group, gathered before the mixer and the MLP and reduce-scattered after them;
- parameter tags (`tensor_model_parallel`, `partition_dim`, fused segments, vocab padding, partial
  gradients) and the map between a rank's shard and the global tensor, for any TP size.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from prism_megatron.config import ParallelConfig


# ----------------------------------------------------------------------------------------------
# Process groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(parallel: ParallelConfig, seed: int, timeout: float | None = None) -> None:
    """Join (or start) torch.distributed from the environment and build megatron-core's TP/DP groups.

    Without RANK/WORLD_SIZE in the environment this process becomes rank 0 of 1 on a free local
    port; the variables are left set because DeepSpeed reads them too. `timeout` (seconds) bounds
    every collective (None: torch's default).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=None if timeout is None else datetime.timedelta(seconds=timeout))
    tp, world = parallel.tensor_model_parallel_size, dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"parallel.tensor_model_parallel_size={tp} must divide the world size {world}")
    # megatron-core's groups take their timeout in whole minutes.
    minutes = {} if timeout is None else {"distributed_timeout_minutes": max(1, math.ceil(timeout / 60))}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, **minutes)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        # Different streams per TP rank for dropout-like ops inside TP regions, as megatron expects.
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


class _DeepSpeedMPU:
    """The `mpu` interface DeepSpeed reads, over megatron-core's parallel_state (no pipeline stages:
    DeepSpeed's "model parallel" group is the TP group). Deliberately without
    get_sequence_parallel_*: DeepSpeed would take that for its own Ulysses sequence parallelism."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)


def deepspeed_mpu() -> _DeepSpeedMPU:
    return _DeepSpeedMPU()


# ----------------------------------------------------------------------------------------------
# Sequence parallelism. megatron-core's own SP helpers allocate on torch.cuda.current_device()
# and use reduce_scatter_tensor, which gloo lacks, so they cannot run in CPU CI; these run on
# both (NCCL: the fused collectives; gloo: list all-gather, all-reduce + slice). The megatron
# layers therefore run with sequence_parallel off, and layers.py puts these functions around them.
# Activations are [B, T, D]; the sequence dimension is 1.

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


# ----------------------------------------------------------------------------------------------
# Parameter tags and the global <-> sharded map.
#
# Every parameter carries megatron-core's attributes `tensor_model_parallel` (split or replicated)
# and `partition_dim`, plus:
#   partition_segments  global sizes of the fused parts along partition_dim; each part is split
#                       evenly and a rank's shard is its slice of every part, in order (so a fused
#                       in_proj shard holds whole heads of q, k, v, ...);
#   vocab_size          set on vocab-parallel tensors: the global tensor has this many rows, the
#                       shards are of the vocabulary padded to a multiple of VOCAB_PAD * tp;
#   sum_grad_over_tp    replicated over TP but applied to rank-local data: its gradient is summed
#                       over the TP group (see add_tp_grad_sum_hooks).

VOCAB_PAD = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_PAD * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ShardSpec:
    partition_dim: int | None  # None: replicated
    segments: tuple[int, ...] | None = None
    vocab_size: int | None = None

    def shard(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """The slice of the global tensor that TP rank `rank` of `tp` holds."""
        if self.partition_dim is None:
            return full
        dim = self.partition_dim
        if self.vocab_size is not None:
            pad = padded_vocab_size(self.vocab_size, tp) - full.shape[dim]
            full = torch.cat([full, full.new_zeros(full.shape[:dim] + (pad,) + full.shape[dim + 1:])], dim)
            return full.chunk(tp, dim)[rank]
        parts = full.split(list(self.segments), dim) if self.segments else (full,)
        return torch.cat([_split_evenly(p, tp, dim)[rank] for p in parts], dim)

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The global tensor from every TP rank's shard, in rank order."""
        if self.partition_dim is None:
            return shards[0]
        dim, tp = self.partition_dim, len(shards)
        if self.vocab_size is not None:
            return torch.cat(shards, dim).narrow(dim, 0, self.vocab_size)
        if not self.segments:
            return torch.cat(shards, dim)
        local = [s // tp for s in self.segments]
        per_rank = [s.split(local, dim) for s in shards]
        return torch.cat([torch.cat([r[i] for r in per_rank], dim) for i in range(len(local))], dim)

    def global_shape(self, local_shape: torch.Size, tp: int) -> tuple[int, ...]:
        shape = list(local_shape)
        if self.partition_dim is not None:
            dim = self.partition_dim
            shape[dim] = self.vocab_size if self.vocab_size is not None else (
                sum(self.segments) if self.segments else shape[dim] * tp)
        return tuple(shape)


def _split_evenly(x: torch.Tensor, tp: int, dim: int) -> tuple[torch.Tensor, ...]:
    if x.shape[dim] % tp:
        raise ValueError(f"cannot split a dimension of {x.shape[dim]} over {tp} tensor-parallel ranks")
    return x.chunk(tp, dim)


def tag_sharded(param: torch.nn.Parameter, partition_dim: int, segments: tuple[int, ...] | None = None) -> None:
    """Mark a parameter as split over TP along `partition_dim` (fused parts: `segments`)."""
    if not hasattr(param, "tensor_model_parallel"):
        tensor_parallel.set_tensor_model_parallel_attributes(param, True, partition_dim, 1)
    param.partition_segments = segments


def tag_vocab_parallel(param: torch.nn.Parameter, vocab_size: int) -> None:
    if not hasattr(param, "tensor_model_parallel"):
        tensor_parallel.set_tensor_model_parallel_attributes(param, True, 0, 1)
    param.vocab_size = vocab_size


def tag_replicated(param: torch.nn.Parameter, sum_grad_over_tp: bool) -> None:
    tensor_parallel.set_tensor_model_parallel_attributes(param, False, -1, 1)
    param.sum_grad_over_tp = sum_grad_over_tp


def shard_spec(param: torch.Tensor) -> ShardSpec:
    if not hasattr(param, "tensor_model_parallel"):
        raise ValueError(f"parameter of shape {list(param.shape)} carries no tensor-parallel tag")
    if not param.tensor_model_parallel:
        return ShardSpec(None)
    return ShardSpec(param.partition_dim, getattr(param, "partition_segments", None), getattr(param, "vocab_size", None))


def _gather_global(param: torch.nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    spec = shard_spec(param)
    if spec.partition_dim is None or tp_size() == 1:
        return spec.unshard([local.clone()])
    shards = [torch.empty_like(local) for _ in range(tp_size())]
    dist.all_gather(shards, local.contiguous(), group=tp_group())
    return spec.unshard(shards)


def global_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's global tensor, gathered over the TP group (a collective: call on all ranks)."""
    return {name: _gather_global(p, p.detach()) for name, p in model.named_parameters()}


def global_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a global tensor (a collective: call on all ranks)."""
    return {name: _gather_global(p, p.grad.detach()) for name, p in model.named_parameters()}


@torch.no_grad()
def load_global_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every global tensor in `state` into the model's parameters."""
    params = dict(model.named_parameters())
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(f"global state does not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for name, p in params.items():
        spec = shard_spec(p)
        expected = spec.global_shape(p.shape, tp_size())
        if tuple(state[name].shape) != expected:
            raise ValueError(f"global tensor {name} has shape {list(state[name].shape)}, the model needs {list(expected)}")
        p.copy_(spec.shard(state[name].to(p.device), tp_rank(), tp_size()))


def add_tp_grad_sum_hooks(model: torch.nn.Module) -> None:
    """Sum over the TP group the gradients of replicated parameters applied to rank-local data.

    A hook on the parameter runs before its gradient is accumulated into .grad, so DeepSpeed's
    ZeRO-2 reduction (which starts from the accumulated gradient, overlapped with backward)
    already sees the sum: megatron-core's finalize_model_grads does this after backward, but
    DeepSpeed never calls it.
    """
    if tp_size() == 1:
        return
    for p in model.parameters():
        if getattr(p, "sum_grad_over_tp", False):
            p.register_hook(_sum_over_tp)


def _sum_over_tp(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=tp_group())
    return grad
