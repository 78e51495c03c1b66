"""Chunk-parallel PRISM recurrence in Triton: forward and backward as one autograd function.

The forward runs four kernels (docs/PRISM.md section 4): solve.py (decay cumsum G and the triangular
inverse T), wy.py (WY vectors W^ and pseudo-values U~), state.py (the inter-chunk state scan, which
also forms U = U~ - W^ S_0) and output.py. The backward takes G, T, W^, U~, the chunk states and U
from the forward, runs the reverse state scan, then the chunk-local gradients (local_grad.py: through
the pseudo-values, through the output and end state, and the extra keys') and the gradients through
the triangular system's matrices (wy.py). Each kernel module has a launcher next to its kernels, and
launch_config.py the block sizes, warps and pipelining depths they all use. Keeping W^, U~, the states
and U costs 640 bf16 values per token and head at K = V = 128 (the inputs take 896 at L = 3);
recomputing them, as fla does for Gated DeltaNet, re-runs the sequential scan, which cost more
than the memory saved is worth on long sequences (docs/PERFORMANCE.md). They are saved with
save_for_backward, so activation checkpointing that works through saved-tensor hooks
(torch.utils.checkpoint) sees them too.

For 16-bit inputs, products take bfloat16 operands and intermediates are kept in the input dtype, as
in fla's Gated DeltaNet kernels; the triangular inverse's block merges take TF32 operands; decays, the
running state and all accumulations are float32. On the hardest inputs of the tests (decay and beta
near 1, K = V = 128) that keeps o inside its bfloat16 budget; TF32 operands and float32 intermediates
would be more precise, and slower (docs/PERFORMANCE.md).

Sequences are always handled as packed: a batch of B rows of length T is B sequences of
cu_seqlens = [0, T, 2T, ...] over the flattened tokens, and every chunk lies inside one sequence.
"""
from __future__ import annotations

import functools

import torch

from .launch_config import PackedChunkTable
from .local_grad import ChunkLocalGrads, extra_key_grad, output_state_grad, pseudo_value_grad
from .output import output_fwd
from .solve import solve_fwd
from .state import du_local, state_bwd, state_fwd
from .wy import wy_bwd, wy_fwd

MAX_HEAD_DIM = 256
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=16)
def _fixed_length_table(B: int, T: int, device: torch.device) -> PackedChunkTable:
    """The chunk table of B rows of T tokens. Building a table reads its chunk count back from the device,
    a host sync that costs more than the forward's kernels at training shapes; fixed-length batches
    repeat the same few shapes, so each is built once."""
    return PackedChunkTable(torch.arange(B + 1, device=device, dtype=torch.int64) * T)


class ChunkPrismFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, d, kx, beta, g, scale, initial_state, output_final_state, table):
        g_cum, t_mat = solve_fwd(k=k, beta=beta, g=g, table=table)
        w, u_tilde = wy_fwd(k=k, kx=kx, d=d, beta=beta, g_cum=g_cum, t_mat=t_mat, table=table)
        states, u, final = state_fwd(k=k, kx=kx, d=d, beta=beta, g_cum=g_cum, w=w, u_tilde=u_tilde,
                                     initial_state=initial_state, output_final_state=output_final_state, table=table)
        o = output_fwd(q=q, k=k, kx=kx, d=d, beta=beta, g_cum=g_cum, states=states, u=u, scale=scale, table=table)
        ctx.save_for_backward(q, k, d, kx, beta, initial_state, g_cum, t_mat, w, u_tilde, states, u)
        ctx.scale, ctx.table, ctx.g_dtype = scale, table, g.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, d, kx, beta, initial_state, g_cum, t_mat, w, u_tilde, states, u = ctx.saved_tensors
        scale, table = ctx.scale, ctx.table
        do = do.contiguous()
        du_output = du_local(q=q, k=k, g_cum=g_cum, do=do, scale=scale, table=table)
        d_states, du, dh0 = state_bwd(q=q, k=k, w=w, g_cum=g_cum, do=do, du_local=du_output, dht=dht,
                                      with_initial_state=initial_state is not None, scale=scale, table=table)
        del du_output  # float32, but gone before the gradient buffers below are made

        grads = ChunkLocalGrads.empty(q, d)
        pseudo_value_grad(k=k, d=d, beta=beta, g_cum=g_cum, t_mat=t_mat, w=w, u_tilde=u_tilde, states=states,
                          du=du, out=grads, table=table)
        output_state_grad(q=q, k=k, kx=kx, d=d, beta=beta, g_cum=g_cum, states=states, u=u, d_states=d_states,
                          do=do, scale=scale, out=grads, table=table)
        extra_key_grad(q=q, k=k, kx=kx, d=d, beta=beta, g_cum=g_cum, d_states=d_states, d_r=du, do=do, scale=scale,
                       out=grads, table=table)
        del d_states, du  # lowers the peak: wy_bwd's outputs can take their memory
        dk, dkx, dbeta, dg = wy_bwd(k=k, kx=kx, beta=beta, g_cum=g_cum, partial=grads, g_dtype=ctx.g_dtype,
                                    table=table)
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return grads.dq, dk, grads.dd, dkx, dbeta, dg, None, dh0, None, None


def _check_kernel_limits(q: torch.Tensor, d: torch.Tensor) -> None:
    """What this kernel supports beyond the op's contract (checked by op.py)."""
    K, V = q.shape[-1], d.shape[-1]
    if q.dtype not in INPUT_DTYPES:
        raise TypeError(f"the Triton PRISM kernel takes {INPUT_DTYPES} inputs, got {q.dtype}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"the Triton PRISM kernel supports K, V <= {MAX_HEAD_DIM}, got K={K}, V={V}")


def chunk_prism_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    d: torch.Tensor,
    kx: torch.Tensor | None,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    table: PackedChunkTable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PRISM recurrence (contract: docs/PRISM.md section 1, checked by op.py's prism_recurrence);
    returns (o, final_state or None). `table`, cu_seqlens' chunk table built already, saves the host sync
    of building it here."""
    _check_kernel_limits(q, d)
    B, T, H, K = q.shape
    if table is None and cu_seqlens is None:
        table = _fixed_length_table(B, T, q.device)
    elif table is None:
        table = PackedChunkTable(cu_seqlens.to(device=q.device, dtype=torch.int64))
    flat = [None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, d, kx, beta, g)]
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o, final = ChunkPrismFunction.apply(*flat, K**-0.5 if scale is None else scale, initial_state,
                                        output_final_state, table)
    return o.view(B, T, H, d.shape[-1]), final
