"""The model's building blocks around megatron-core's TP layers: linear layers that also speak our
sequence parallelism, RMSNorm and the SwiGLU MLP. Their parameters are made and tagged in
sharding.py."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn

from prism_megatron.kernels.fused.fusable import Fusable, upcast
from prism_megatron.process_groups import tp_size
from prism_megatron.sequence_parallel import gather_sequence, reduce_scatter_sequence
from prism_megatron.sharding import (
    Init,
    constant_init,
    normal_init,
    replicated_parameter,
    set_init,
    tag_sharded,
    uniform_init,
)


# GEMM outputs are formed in rows of a multiple of this many columns: rows of 16 bytes in bf16, which
# cuBLAS's fast kernels need (an odd width, e.g. in_proj's with 6 heads' decay logits, gets slow ones).
ALIGN_COLUMNS = 8


def megatron_config_for(tp: int, dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    """The config megatron-core's TP layers read. Its sequence_parallel stays off: our own SP
    functions (sequence_parallel.py) wrap the layers instead, since megatron's need CUDA (see there).
    Initialization is ours too (sharding.py: global_init)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,
        params_dtype=dtype,
    )


def no_megatron_init(weight: torch.Tensor) -> None:
    raise AssertionError("megatron-core initialization is off; parameters are drawn by global_init")


# ----------------------------------------------------------------------------------------------
# Linear layers


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear (no bias, output left split over TP).

    Under sequence parallelism the input arrives split along the sequence: it is all-gathered
    here, and the backward of that gather already sums the input gradient over TP, so megatron's
    own all-reduce of it is disabled (`disable_grad_reduce`). `segments` are the global sizes of
    fused outputs, each split over TP, so a rank's output holds its part of every one. A rank's
    output width that is not a multiple of ALIGN_COLUMNS is formed by a GEMM with zero rows added
    to the weight, and the added columns dropped.
    """

    def __init__(self, input_size: int, output_size: int, *, megatron_config: ModelParallelConfig,
                 init: Init, sequence_parallel: bool, segments: tuple[int, ...] | None = None, **kwargs):
        if segments is not None and sum(segments) != output_size:
            raise ValueError(f"fused segments {segments} do not add up to the output size {output_size}")
        for size in segments or (output_size,):
            if size % megatron_config.tensor_model_parallel_size:
                raise ValueError(f"output part of size {size} does not divide over "
                                 f"{megatron_config.tensor_model_parallel_size} tensor-parallel ranks")
        super().__init__(input_size, output_size, config=megatron_config, init_method=no_megatron_init,
                         bias=False, gather_output=False, disable_grad_reduce=sequence_parallel, **kwargs)
        self.sequence_parallel_input = sequence_parallel
        if self.weight is not None:
            tag_sharded(self.weight, 0, segments)
            set_init(self.weight, init)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        pad = -weight.shape[0] % ALIGN_COLUMNS
        if pad:
            padded = F.linear(self.parallel_input(x), F.pad(weight, (0, 0, 0, pad)))
            return padded.narrow(-1, 0, weight.shape[0])
        if self.sequence_parallel_input:
            x = gather_sequence(x)
        return super().forward(x, weight)[0]

    def parallel_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as this layer's GEMM takes it, for ops that fuse the GEMM (linear_cross_entropy):
        gathered along the sequence under SP, else copied into the TP region (backward: summed
        over TP, the all-reduce megatron's layer does on its input gradient)."""
        if self.sequence_parallel_input:
            return gather_sequence(x)
        return tensor_parallel.copy_to_tensor_model_parallel_region(x)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear (no bias, input split over TP). Its output is summed over
    TP: all-reduced by megatron's reduction, or under sequence parallelism reduce-scattered along the
    sequence by sequence_parallel.reduce_scatter_sequence (megatron's own reduce-scatter needs CUDA)."""

    def __init__(self, input_size: int, output_size: int, *, megatron_config: ModelParallelConfig,
                 init: Init, sequence_parallel: bool):
        if input_size % megatron_config.tensor_model_parallel_size:
            raise ValueError(f"input size {input_size} does not divide over "
                             f"{megatron_config.tensor_model_parallel_size} tensor-parallel ranks")
        super().__init__(input_size, output_size, config=megatron_config, init_method=no_megatron_init,
                         bias=False, input_is_parallel=True, skip_bias_add=True)
        self.sequence_parallel_output = sequence_parallel
        tag_sharded(self.weight, 1)
        set_init(self.weight, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce_output(F.linear(x, self.weight))

    def of(self, fn, *inputs: torch.Tensor) -> torch.Tensor:
        """self(fn(*inputs)) for an elementwise fn, which the backward runs again rather than keep its
        output (LinearOfRecomputed)."""
        return self._reduce_output(LinearOfRecomputed.apply(fn, self.weight, *inputs))

    def _reduce_output(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's partial product -> the layer's output: summed over TP (reduce-scattered along
        the sequence under SP)."""
        if self.sequence_parallel_output:
            return reduce_scatter_sequence(y)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(y)


# ----------------------------------------------------------------------------------------------
# Norms, MLP


def use_fused(mode: str, x: torch.Tensor) -> bool:
    """model.fused_ops: "auto" takes the fused kernels (torch.compile, Triton) for CUDA tensors and the
    PyTorch reference elsewhere; "on" takes them everywhere (on the CPU through Triton's interpreter
    and torch.compile's C++ backend: for checking them against the reference); "off" takes the
    reference everywhere (for checking the fused model on the GPU)."""
    return mode == "on" or (mode == "auto" and x.is_cuda)


@Fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = upcast(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * upcast(weight)).to(x.dtype)


@Fusable
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) * SiLU(gate): the mixer's output norm."""
    return rms_norm.eager(x, weight, eps) * F.silu(gate)


@Fusable
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the fused [..., 2F] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class LinearOfRecomputed(torch.autograd.Function):
    """F.linear(fn(*inputs), weight) that keeps fn's inputs, not its output, for the backward and runs
    fn again there: for an elementwise fn whose inputs are held anyway (the SwiGLU of the MLP, the
    mixer's gated output norm), one more elementwise pass instead of the GEMM input held from forward
    to backward."""

    @staticmethod
    def forward(ctx, fn, weight, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(weight, *inputs)
        return F.linear(fn(*inputs), weight)

    @staticmethod
    def backward(ctx, dy):
        weight, *inputs = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            hidden = ctx.fn(*inputs)
        dweight = dy.flatten(0, -2).T @ hidden.detach().flatten(0, -2)
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad(hidden, wanted, dy @ weight) if wanted else ())
        return (None, dweight, *(next(grads) if x.requires_grad else None for x in inputs))


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in (at least) float32.

    Its weight is replicated over TP. `partial_input` says the rank sees only part of the data
    the weight is applied to (a sequence slice under SP, or a subset of heads), so its gradient
    must be summed over TP.
    """

    def __init__(self, dim: int, eps: float, megatron_config: ModelParallelConfig, partial_input: bool,
                 fused_ops: str):
        super().__init__()
        self.eps = eps
        self.fused_ops = fused_ops
        self.weight = replicated_parameter((dim,), constant_init(1.0), megatron_config, sum_grad_over_tp=partial_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(use_fused(self.fused_ops, x), x, self.weight, self.eps)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused column-parallel GEMM."""

    def __init__(self, hidden: int, ffn: int, *, megatron_config: ModelParallelConfig, init_std: float,
                 out_init_std: float, sequence_parallel: bool, fused_ops: str):
        super().__init__()
        self.fused_ops = fused_ops
        self.gate_up = ColumnParallelLinear(hidden, 2 * ffn, megatron_config=megatron_config,
                                            init=normal_init(init_std), sequence_parallel=sequence_parallel,
                                            segments=(ffn, ffn))
        self.down = RowParallelLinear(ffn, hidden, megatron_config=megatron_config, init=normal_init(out_init_std),
                                      sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down.of(functools.partial(swiglu, use_fused(self.fused_ops, x)), self.gate_up(x))


def conv_init(width: int) -> Init:
    """The default of torch's depthwise Conv1d (fan-in = the kernel width)."""
    bound = 1.0 / math.sqrt(width)
    return uniform_init(-bound, bound)


def check_divides(what: str, size: int) -> None:
    if size % tp_size():
        raise ValueError(f"{what} = {size} does not divide by the tensor-parallel size {tp_size()}")
