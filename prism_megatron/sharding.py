"""Every parameter of the model: how it is created, drawn and split over the tensor-parallel ranks.

A layer makes its parameters here (`sharded_parameter`, `replicated_parameter`, or megatron-core's
TP layers followed by `tag_sharded` / `tag_vocab_parallel`), so a parameter's shape, initializer and
TP split are written in one call. The same tags map a rank's shard to the global tensor and back
(`global_state_dict`, `load_global_state_dict`, `ShardSpec`), at any TP size.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn

from prism_megatron.process_groups import tp_group, tp_rank, tp_size

# ----------------------------------------------------------------------------------------------
# Initialization. Each parameter carries `global_init(shape, generator, device) -> tensor`, which
# draws its *global* tensor; the model draws it with a generator seeded by (seed, parameter name)
# and keeps this rank's shard, so a TP=2 model starts from the TP=1 model's weights, split.

Init = Callable[[tuple[int, ...], torch.Generator, torch.device], torch.Tensor]


def normal_init(std: float) -> Init:
    return lambda shape, gen, device: torch.empty(shape, device=device).normal_(0.0, std, generator=gen)


def uniform_init(low: float, high: float) -> Init:
    return lambda shape, gen, device: torch.empty(shape, device=device).uniform_(low, high, generator=gen)


def constant_init(value: float | Sequence[float]) -> Init:
    """Every entry `value`; a sequence gives the entries along the last dimension."""
    return lambda shape, gen, device: torch.tensor(value, device=device).expand(shape).clone()


def set_init(param: nn.Parameter, init: Init) -> nn.Parameter:
    param.global_init = init
    return param


@torch.no_grad()
def draw_parameters(module: nn.Module, seed: int) -> None:
    """Draw every parameter of `module` as its global tensor, with a generator seeded by `seed` and
    the parameter's name, and keep this TP rank's shard (meta parameters are left alone)."""
    for name, p in module.named_parameters():
        if p.is_meta:
            continue
        # Modulo the generator's 64 bits: any seed works (an unseeded process's is a 64-bit number).
        gen = torch.Generator(device=p.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**64)
        spec = shard_spec(p)
        full = p.global_init(spec.global_shape(p.shape, tp_size()), gen, p.device)
        p.copy_(spec.shard(full, tp_rank(), tp_size()))


def _new_parameter(shape: tuple[int, ...], config: ModelParallelConfig) -> nn.Parameter:
    # Like megatron's layers: the default device on the CPU, so that a model built under
    # `with torch.device("meta")` allocates nothing (to count parameters of large presets).
    device = None if config.use_cpu_initialization else torch.cuda.current_device()
    return nn.Parameter(torch.empty(shape, device=device, dtype=config.params_dtype))


def sharded_parameter(local_shape: tuple[int, ...], init: Init, config: ModelParallelConfig,
                      segments: tuple[int, ...] | None = None) -> nn.Parameter:
    """A parameter of this rank's heads or channels, split over TP along dim 0."""
    p = set_init(_new_parameter(local_shape, config), init)
    tag_sharded(p, 0, segments)
    return p


def replicated_parameter(shape: tuple[int, ...], init: Init, config: ModelParallelConfig,
                         sum_grad_over_tp: bool) -> nn.Parameter:
    """A parameter every TP rank holds whole; `sum_grad_over_tp` when each rank applies it to only
    part of the data (see tag_replicated)."""
    p = set_init(_new_parameter(shape, config), init)
    tag_replicated(p, sum_grad_over_tp)
    return p


# ----------------------------------------------------------------------------------------------
# Tags and the global <-> sharded map.
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


def gather_global(param: torch.nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    spec = shard_spec(param)
    if spec.partition_dim is None or tp_size() == 1:
        return spec.unshard([local.clone()])
    shards = [torch.empty_like(local) for _ in range(tp_size())]
    dist.all_gather(shards, local.contiguous(), group=tp_group())
    return spec.unshard(shards)


def global_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's global tensor, gathered over the TP group (a collective: call on all ranks)."""
    return {name: gather_global(p, p.detach()) for name, p in model.named_parameters()}


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
