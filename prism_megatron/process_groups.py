"""Process groups: torch.distributed and megatron-core's tensor-/context-/data-parallel groups, and the
adapter DeepSpeed's `mpu=` takes so that it reduces gradients over the data-parallel group only (with
the context-parallel ranks: they hold the same parameters and parts of the same samples).

megatron-core's `parallel_state` owns the groups; this module starts them from the environment
(torchrun, srun or a bare call) and names the few queries the model needs.
"""
from __future__ import annotations

import datetime
import math
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from prism_megatron.config import ParallelConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(parallel: ParallelConfig, seed: int, timeout: float | None = None) -> None:
    """Join (or start) torch.distributed from the environment and build megatron-core's TP/CP/DP groups.

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
    tp, cp, world = parallel.tensor_model_parallel_size, parallel.context_parallel_size, dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"parallel.tensor_model_parallel_size={tp} must divide the world size {world}")
    if cp < 1 or world % (tp * cp):
        raise ValueError(f"parallel.context_parallel_size={cp} times the tensor-parallel size {tp} "
                         f"must divide the world size {world}")
    # megatron-core's groups take their timeout in whole minutes.
    minutes = {} if timeout is None else {"distributed_timeout_minutes": max(1, math.ceil(timeout / 60))}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, **minutes)
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


def cp_group() -> dist.ProcessGroup:
    return parallel_state.get_context_parallel_group()


def cp_rank() -> int:
    return parallel_state.get_context_parallel_rank()


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def data_rank() -> int:
    """This rank's DP index: among the ranks that read different samples (CP ranks share them).
    "DP" in this project always means that; DeepSpeed's data-parallel group is DP x CP (see
    _DeepSpeedMPU)."""
    return parallel_state.get_data_parallel_rank()


def data_size() -> int:
    """DP: how many ranks read different samples (world / (TP x CP))."""
    return parallel_state.get_data_parallel_world_size()


def _dp_cp_rank() -> int:
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def _dp_cp_size() -> int:
    return parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def _dp_cp_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


class _DeepSpeedMPU:
    """The `mpu` interface DeepSpeed reads, over megatron-core's parallel_state (no pipeline stages:
    DeepSpeed's "model parallel" group is the TP group; its data-parallel group is DP x CP, so the
    gradients it averages are those of the whole samples, see context_parallel.py). Deliberately without
    get_sequence_parallel_*: DeepSpeed would take that for its own Ulysses sequence parallelism."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(_dp_cp_rank)
    get_data_parallel_world_size = staticmethod(_dp_cp_size)
    get_data_parallel_group = staticmethod(_dp_cp_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)


def deepspeed_mpu() -> _DeepSpeedMPU:
    return _DeepSpeedMPU()
