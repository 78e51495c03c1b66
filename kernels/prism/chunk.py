"""Chunk-parallel PRISM recurrence in Triton: forward and backward as one autograd function.

The forward runs three kernels (PRISM.md section 4): wy.py (decay cumsum, triangular solve, WY
vectors W^ and pseudo-values U~), state.py (the inter-chunk state scan, which also forms
U = U~ - W^ S_0) and output.py. Only the inputs are kept for the backward, which recomputes the
chunk quantities and states (cheaper than storing them), runs the reverse state scan, then the
chunk-local gradients (local_grad.py, one kernel for the erasure key and one for the
extra keys) and the gradients through the triangular system (wy.py).

Sequences are always handled as packed: a batch of B rows of length T is B sequences of
cu_seqlens = [0, T, 2T, ...] over the flattened tokens, and every chunk lies inside one sequence.
"""
from __future__ import annotations

import torch
import triton

from .local_grad import erase_key_grad_kernel, extra_key_grad_kernel
from .output import output_fwd_kernel
from .state import state_bwd_kernel, state_fwd_kernel
from .wy import wy_bwd_kernel, wy_fwd_kernel

CHUNK = 64
MAX_HEAD_DIM = 256
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class ChunkLayout:
    """Where the chunks of packed sequences lie: per chunk its first token and its sequence's end,
    per sequence its first chunk."""

    def __init__(self, cu_seqlens: torch.Tensor):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        n_chunks = (lengths + CHUNK - 1) // CHUNK
        self.cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        self.chunk_offsets = torch.nn.functional.pad(n_chunks.cumsum(0), (1, 0)).to(torch.int32)
        self.num_chunks = int(self.chunk_offsets[-1])
        self.num_seqs = lengths.numel()
        seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=cu_seqlens.device), n_chunks)
        first = cu_seqlens[seq] + (torch.arange(self.num_chunks, device=cu_seqlens.device)
                                   - self.chunk_offsets[seq].long()) * CHUNK
        self.chunks = torch.stack([first, cu_seqlens[seq + 1]], 1).to(torch.int32).contiguous()


def _meta(q: torch.Tensor, d: torch.Tensor) -> dict:
    """Block sizes: whole key rows (BK), value columns in blocks of BV, narrower where float32 tiles
    or K = 256 would overflow Hopper's 227 KiB of shared memory."""
    K, L, V = q.shape[-1], d.shape[-2], d.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    ieee = q.dtype == torch.float32
    BV = 16 if ieee else 32 if BK > 128 else 64
    return dict(K=K, V=V, L=L, BK=BK, BV=min(BV, max(16, triton.next_power_of_2(V))),
                IEEE=ieee, num_warps=4 if BK <= 64 else 8)


def _scan_stages(m: dict) -> int:
    """Software-pipelining depth of the state scans: each stage buffers a chunk's tiles of k, kx, d,
    w and u~, which in float32 leaves no room for a second."""
    return 1 if m["IEEE"] else 2


def _chunk_states(q, k, d, kx, beta, g, initial_state, layout, output_final_state):
    """wy.py then state.py: the per-chunk quantities and the state at each chunk's start."""
    TT, H, K = q.shape
    m = _meta(q, d)
    V = m["V"]
    g_cum = torch.empty(TT, H, dtype=torch.float32, device=q.device)
    t_mat = torch.empty(TT, H, CHUNK, dtype=torch.float32, device=q.device)
    w = torch.empty(TT, H, K, dtype=q.dtype, device=q.device)
    # The pseudo-values stay float32: in 16 bits their rounding alone costs ~1e-3 of relative error in o.
    u_tilde = torch.empty(TT, H, V, dtype=torch.float32, device=q.device)
    wy_fwd_kernel[(layout.num_chunks, H)](k, kx, d, beta, g, g_cum, t_mat, w, u_tilde, layout.chunks,
                                          H=H, C=CHUNK, **m)
    states = torch.empty(layout.num_chunks, H, K, V, dtype=q.dtype, device=q.device)
    u = torch.empty(TT, H, V, dtype=torch.float32, device=q.device)
    final = torch.empty(layout.num_seqs, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    state_fwd_kernel[(layout.num_seqs, H, triton.cdiv(V, m["BV"]))](
        k, kx, d, beta, g_cum, w, u_tilde, initial_state, states, u, final, layout.cu_seqlens, layout.chunk_offsets,
        H=H, C=CHUNK, HAS_H0=initial_state is not None, STORE_FINAL=output_final_state, num_stages=_scan_stages(m), **m)
    return g_cum, t_mat, w, u_tilde, states, u, final


class ChunkPrismFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, d, kx, beta, g, scale, initial_state, output_final_state, layout):
        TT, H, K = q.shape
        m = _meta(q, d)
        kx_arg = k if kx is None else kx
        g_cum, _, _, _, states, u, final = _chunk_states(q, k, d, kx_arg, beta, g, initial_state, layout,
                                                         output_final_state)
        o = torch.empty(TT, H, m["V"], dtype=q.dtype, device=q.device)
        output_fwd_kernel[(layout.num_chunks, H, triton.cdiv(m["V"], m["BV"]))](
            q, k, kx_arg, d, beta, g_cum, states, u, o, layout.chunks, scale, H=H, C=CHUNK, **m)
        ctx.save_for_backward(q, k, d, kx, beta, g, initial_state)
        ctx.scale, ctx.layout = scale, layout
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, d, kx, beta, g, initial_state = ctx.saved_tensors
        scale, layout = ctx.scale, ctx.layout
        TT, H, K = q.shape
        m = _meta(q, d)
        V, L = m["V"], m["L"]
        kx_arg = k if kx is None else kx
        g_cum, t_mat, w, u_tilde, states, u, _ = _chunk_states(q, k, d, kx_arg, beta, g, initial_state, layout, False)

        f32 = dict(dtype=torch.float32, device=q.device)
        do = do.contiguous()
        d_states = torch.empty_like(states)
        du = torch.empty(TT, H, V, **f32)
        dh0 = torch.empty(layout.num_seqs, H, K, V, **f32) if initial_state is not None else None
        state_bwd_kernel[(layout.num_seqs, H, triton.cdiv(V, m["BV"]))](
            q, k, w, g_cum, do, dht, dh0, d_states, du, layout.cu_seqlens, layout.chunk_offsets, scale,
            H=H, C=CHUNK, HAS_DHT=dht is not None, HAS_H0=initial_state is not None, num_stages=_scan_stages(m),
            **{key: m[key] for key in ("K", "V", "BK", "BV", "IEEE", "num_warps")})

        dq_acc = torch.empty(TT, H, L, K, **f32)
        dg_acc = torch.empty(TT, H, L, **f32)
        dk = torch.empty(TT, H, K, **f32)
        # With L = 1 the extra-key buffers are never touched: stand-ins keep every pointer valid.
        dkx = torch.empty(TT, H, L - 1, K, **f32) if L > 1 else dk
        dd = torch.empty_like(d)
        dbeta = torch.empty(TT, H, L, **f32)
        d_a = torch.empty(TT, H, CHUNK, **f32)
        d_b = torch.empty(TT, H, L - 1, CHUNK, **f32) if L > 1 else d_a
        erase_key_grad_kernel[(layout.num_chunks, H)](
            q, k, d, beta, g_cum, t_mat, w, u_tilde, states, u, d_states, du, do,
            dq_acc, dk, dd, dbeta, dg_acc, d_a, layout.chunks, scale, H=H, C=CHUNK, num_stages=1, **m)
        if L > 1:
            extra_key_grad_kernel[(layout.num_chunks, H, L - 1)](
                q, k, kx, d, beta, g_cum, t_mat, d_states, du, do,
                dq_acc, dkx, dd, dbeta, dg_acc, d_b, layout.chunks, scale, H=H, C=CHUNK, num_stages=1, **m)
        dq = torch.empty_like(q)
        dg = torch.empty(TT, H, **f32)
        wy_bwd_kernel[(layout.num_chunks, H)](
            k, kx_arg, beta, g_cum, d_a, d_b, dq_acc, dg_acc, dk, dkx, dbeta, dq, dg, layout.chunks,
            H=H, C=CHUNK, **{key: m[key] for key in ("K", "L", "BK", "IEEE", "num_warps")})
        dkx = dkx.to(kx.dtype) if kx is not None else None
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk.to(k.dtype), dd, dkx, dbeta.to(beta.dtype), dg.to(g.dtype), None, dh0, None, None


def _check_kernel_limits(q: torch.Tensor, d: torch.Tensor) -> None:
    """What this kernel supports beyond the op's contract (checked by prism_megatron.ops)."""
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PRISM recurrence (contract: PRISM.md section 1, checked by prism_megatron.ops.prism_recurrence);
    returns (o, final_state or None)."""
    _check_kernel_limits(q, d)
    B, T, H, K = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(B + 1, device=q.device, dtype=torch.int64) * T
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64)
    layout = ChunkLayout(cu_seqlens)
    flat = [None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, d, kx, beta, g)]
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o, final = ChunkPrismFunction.apply(*flat, K**-0.5 if scale is None else scale, initial_state,
                                        output_final_state, layout)
    return o.view(B, T, H, d.shape[-1]), final
