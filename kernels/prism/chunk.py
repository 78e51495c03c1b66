"""Chunk-parallel PRISM recurrence in Triton: forward and backward as one autograd function.

The forward runs four kernels (PRISM.md section 4): solve.py (decay cumsum G and the triangular
inverse T), wy.py (WY vectors W^ and pseudo-values U~), state.py (the inter-chunk state scan, which
also forms U = U~ - W^ S_0) and output.py. The backward takes G, T, W^, U~, the chunk states and U
from the forward, runs the reverse state scan, then the chunk-local gradients (local_grad.py: through
the pseudo-values, through the output and end state, and the extra keys') and the gradients through
the triangular system's matrices (wy.py). Keeping W^, U~, the states and U costs 640 bf16 values per
token and head at K = V = 128 (the inputs take 896 at L = 3); recomputing them, as fla does for Gated
DeltaNet, re-ran the sequential scan and cost 1.9 of 11.6 ms per forward+backward on one 32768-token
sequence (docs/PERFORMANCE.md). They are saved with save_for_backward, so activation checkpointing
that works through saved-tensor hooks (torch.utils.checkpoint) sees them too.

For 16-bit inputs, products take bfloat16 operands and intermediates are kept in the input dtype, as
in fla's Gated DeltaNet kernels; the triangular inverse's block merges take TF32 operands; decays, the
running state and all accumulations are float32. On the hardest inputs of the tests (decay and beta
near 1, K = V = 128) that leaves o 4.2e-3 off the float64 loop, inside its 5e-3 budget; the same
products with TF32 operands and float32 intermediates would give 2.6e-3 at about 0.5 ms more per
forward+backward at B=8 T=2048 H=16 (docs/PERFORMANCE.md).

Sequences are always handled as packed: a batch of B rows of length T is B sequences of
cu_seqlens = [0, T, 2T, ...] over the flattened tokens, and every chunk lies inside one sequence.
"""
from __future__ import annotations

import functools

import torch
import triton

from .local_grad import extra_key_grad_kernel, output_state_grad_kernel, pseudo_value_grad_kernel
from .output import output_fwd_kernel
from .solve import solve_kernel
from .state import du_local_kernel, state_bwd_kernel, state_fwd_kernel
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


@functools.lru_cache(maxsize=16)
def _fixed_length_layout(B: int, T: int, device: torch.device) -> ChunkLayout:
    """The layout of B rows of T tokens. Building a layout reads its chunk count back from the device,
    a host sync that costs more than the forward's kernels at training shapes; fixed-length batches
    repeat the same few shapes, so each is built once."""
    return ChunkLayout(torch.arange(B + 1, device=device, dtype=torch.int64) * T)


def _meta(q: torch.Tensor, d: torch.Tensor) -> dict:
    """Block sizes: whole key rows (BK), value columns in blocks of BV: 64 for 16-bit inputs, 16 for
    float32 ones, whose tiles take twice the shared memory. (16-bit blocks of 32 value columns in every
    kernel hit an illegal memory access on the H200 under Triton 3.6, though they compute correctly under
    the interpreter: most likely Triton's Hopper wgmma fault with 32-wide dot operands, triton-lang/triton
    #10573 and #11366, which do not occur on 3.5. The state scans alone run and pass the GPU tests with
    32: _scan_values.)"""
    K, L, V = q.shape[-1], d.shape[-2], d.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    ieee = q.dtype == torch.float32
    BV = 16 if ieee else 64
    return dict(K=K, V=V, L=L, BK=BK, BV=min(BV, max(16, triton.next_power_of_2(V))), IEEE=ieee)


# Warps per kernel at BK = 128, from per-kernel timings on an H200 (docs/PERFORMANCE.md); the
# backward's gradient kernels hold several [C, BK] float32 accumulators and want the registers of 8.
WARPS = dict(solve=1, wy_fwd=4, state_fwd=4, output=4, du_local=4, state_bwd=8, pseudo_value_grad=4,
             output_state_grad=8, extra_key_grad=8, wy_bwd=4, wy_bwd_extra_keys=8)
# Kernels whose largest tiles are the chunk's [C, C] float32 matrices, which do not shrink with K. (Halving
# wy_fwd's and output's warps at K = V = 64 made them 0.3 ms slower at B=8 T=2048 H=32 L=3 on the H200;
# halving wy_bwd's with extra keys made the whole forward+backward there 0.26 ms faster: 3.88 against 4.14.)
SQUARE_TILED = ("solve", "wy_fwd", "output", "pseudo_value_grad", "wy_bwd")


def _warps(kernel: str, m: dict) -> int:
    """Half as many warps for K <= 64, whose [C, BK] and [BK, BV] tiles are half as large."""
    return WARPS[kernel] // 2 if m["BK"] <= 64 and kernel not in SQUARE_TILED else WARPS[kernel]


def _stages(stage_bytes: int, resident_bytes: int = 0, deepest: int = 2) -> int:
    """Software-pipelining depth of a kernel's loop over chunks (state scans) or value blocks whose every
    iteration loads stage_bytes of tiles, next to resident_bytes of tiles loaded once: the most stages, up
    to deepest, that fit in Hopper's 227 KiB of shared memory with room to spare."""
    fits = [n for n in range(2, deepest + 1) if resident_bytes + n * stage_bytes <= 210 * 1024]
    return max(fits, default=1)


def _local_stages(m: dict, stage_bytes: int, resident_bytes: int) -> int:
    """_stages for the chunk-local gradient kernels' loops over value blocks: up to 3 (Triton's default),
    which ran faster than 2 with 16-bit inputs at K = 128 on the H200 (docs/PERFORMANCE.md); up to 2 for
    float32 ones, whose tiles come closest to the shared-memory limit."""
    return _stages(stage_bytes, resident_bytes, 2 if m["IEEE"] else 3)


def _tile_bytes(m: dict, key: int = 0, value: int = 0, state: int = 0, square: int = 0) -> int:
    """Bytes of tiles in the input dtype: key [C, BK], value [C, BV], state [BK, BV] and square [C, C] ones."""
    size = 4 if m["IEEE"] else 2
    return size * (CHUNK * (key * m["BK"] + value * m["BV"] + square * CHUNK) + state * m["BK"] * m["BV"])


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _scan_values(m: dict, num_seqs: int, H: int, device: torch.device) -> dict:
    """m with value blocks of 32 columns for 16-bit inputs where the state scans would otherwise run fewer
    programs than the GPU has multiprocessors (long single sequences): the scans are sequential over
    chunks, so their time is the chunk count times one step's latency, and more programs share it out
    (at B=1 T=32768 H=16 K=V=128 on the H200: forward+backward 12.1 to 11.6 ms at L=3, 6.3 to 5.8 at L=1).
    With many programs the scans keep 64 columns; 32 there is untimed (fla's reverse scan autotunes to 32
    at B=8 T=2048)."""
    if m["IEEE"] or num_seqs * H * triton.cdiv(m["V"], m["BV"]) >= _multiprocessors(device):
        return m
    return dict(m, BV=min(m["BV"], 32))


def _wide_values(m: dict) -> dict:
    """m with value blocks of up to 128 columns for 16-bit inputs at K <= 128 (float32 tiles, or K = 256, take
    twice the shared memory): for kernels that form a [C, C] matrix to multiply every value block with."""
    return dict(m, BV=m["BV"] if m["IEEE"] or m["BK"] > 128 else min(128, max(16, triton.next_power_of_2(m["V"]))))


def _solve(k, beta, g, layout):
    """solve.py: G (float32) and T (the input dtype), per token and head."""
    TT, H, K = k.shape
    g_cum = torch.empty(TT, H, dtype=torch.float32, device=k.device)
    t_mat = torch.empty(TT, H, CHUNK, dtype=k.dtype, device=k.device)
    solve_kernel[(layout.num_chunks, H)](k, beta, g, g_cum, t_mat, layout.chunks, H=H, K=K, L=beta.shape[-1], C=CHUNK,
                                         BK=max(16, triton.next_power_of_2(K)), IEEE=k.dtype == torch.float32,
                                         num_warps=WARPS["solve"])
    return g_cum, t_mat


def _chunk_states(k, d, kx, beta, g_cum, t_mat, initial_state, layout, output_final_state):
    """wy.py then state.py: W^, U~, the state at each chunk's start, U (all in the input dtype) and the
    final states (float32)."""
    TT, H, K = k.shape
    m = _meta(k, d)
    V = m["V"]
    w = torch.empty(TT, H, K, dtype=k.dtype, device=k.device)
    u_tilde = torch.empty(TT, H, V, dtype=k.dtype, device=k.device)
    L = m["L"]
    # wy_fwd forms the extra keys' kernel matrices B^l once per value block.
    m_wy = _wide_values(m)
    # Per value block: the extra keys and the L directions, plus k and the float32 right-hand side.
    wy_stage = _tile_bytes(m_wy, key=L + 1, value=L) + 4 * CHUNK * m_wy["BV"]
    wy_fwd_kernel[(layout.num_chunks, H)](k, kx, d, beta, g_cum, t_mat, w, u_tilde, layout.chunks, H=H, C=CHUNK,
                                          num_warps=_warps("wy_fwd", m), num_stages=_stages(wy_stage), **m_wy)
    states = torch.empty(layout.num_chunks, H, K, V, dtype=k.dtype, device=k.device)
    u = torch.empty(TT, H, V, dtype=k.dtype, device=k.device)
    final = torch.empty(layout.num_seqs, H, K, V, dtype=torch.float32, device=k.device) if output_final_state else None
    # Per chunk: k, w and the extra keys; U~ and the L - 1 extra directions.
    m_scan = _scan_values(m, layout.num_seqs, H, k.device)
    state_fwd_kernel[(layout.num_seqs, H, triton.cdiv(V, m_scan["BV"]))](
        k, kx, d, beta, g_cum, w, u_tilde, initial_state, states, u, final, layout.cu_seqlens, layout.chunk_offsets,
        H=H, C=CHUNK, HAS_H0=initial_state is not None, STORE_FINAL=output_final_state,
        num_warps=_warps("state_fwd", m), num_stages=_stages(_tile_bytes(m_scan, key=L + 1, value=L)), **m_scan)
    return w, u_tilde, states, u, final


class ChunkPrismFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, d, kx, beta, g, scale, initial_state, output_final_state, layout):
        TT, H, K = q.shape
        m = _meta(q, d)
        kx_arg = k if kx is None else kx
        g_cum, t_mat = _solve(k, beta, g, layout)
        w, u_tilde, states, u, final = _chunk_states(k, d, kx_arg, beta, g_cum, t_mat, initial_state, layout,
                                                     output_final_state)
        o = torch.empty(TT, H, m["V"], dtype=q.dtype, device=q.device)
        # Q K^T and the Q (Kappa^l)^T are formed once per value block.
        m_out = _wide_values(m)
        output_fwd_kernel[(layout.num_chunks, H, triton.cdiv(m["V"], m_out["BV"]))](
            q, k, kx_arg, d, beta, g_cum, states, u, o, layout.chunks, scale, H=H, C=CHUNK,
            num_warps=_warps("output", m), **m_out)
        ctx.save_for_backward(q, k, d, kx, beta, initial_state, g_cum, t_mat, w, u_tilde, states, u)
        ctx.scale, ctx.layout, ctx.g_dtype = scale, layout, g.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, d, kx, beta, initial_state, g_cum, t_mat, w, u_tilde, states, u = ctx.saved_tensors
        scale, layout = ctx.scale, ctx.layout
        TT, H, K = q.shape
        m = _meta(q, d)
        V, L = m["V"], m["L"]
        kx_arg = k if kx is None else kx

        f32 = dict(dtype=torch.float32, device=q.device)
        do = do.contiguous()
        d_states = torch.empty(states.shape, dtype=q.dtype, device=q.device)
        du_local = torch.empty(TT, H, V, **f32)
        m_no_l = {key: m[key] for key in ("K", "V", "BK", "BV", "IEEE")}  # du_local and the scan take no L
        m_wide = _wide_values(m_no_l)
        du_local_kernel[(layout.num_chunks, H, triton.cdiv(V, m_wide["BV"]))](
            q, k, g_cum, do, du_local, layout.chunks, scale, H=H, C=CHUNK, num_warps=_warps("du_local", m), **m_wide)
        du = torch.empty(TT, H, V, dtype=q.dtype, device=q.device)
        dh0 = torch.empty(layout.num_seqs, H, K, V, **f32) if initial_state is not None else None
        m_scan = _scan_values(m_no_l, layout.num_seqs, H, q.device)
        state_bwd_kernel[(layout.num_seqs, H, triton.cdiv(V, m_scan["BV"]))](
            q, k, w, g_cum, do, du_local, dht, dh0, d_states, du, layout.cu_seqlens, layout.chunk_offsets, scale,
            H=H, C=CHUNK, HAS_DHT=dht is not None, HAS_H0=initial_state is not None, num_warps=_warps("state_bwd", m),
            num_stages=_stages(_tile_bytes(m_scan, key=3, value=3)), **m_scan)
        del du_local  # float32, but gone before the gradient buffers below are made

        # dq is final after output_state_grad; the other gradients stay float32 partials until wy_bwd.
        dq = torch.empty_like(q)
        dg_acc = torch.empty(TT, H, 2, **f32)
        dk_acc = torch.empty(TT, H, K, **f32)
        # With L = 1 the extra-key buffers are never touched: stand-ins keep every pointer valid.
        dkx_acc = torch.empty(TT, H, L - 1, K, **f32) if L > 1 else dk_acc
        dd = torch.empty_like(d)
        dbeta_acc = torch.empty(TT, H, L, **f32)
        d_a = torch.empty(TT, H, CHUNK, **f32)
        d_b = torch.empty(TT, H, L - 1, CHUNK, **f32) if L > 1 else d_a
        grid = (layout.num_chunks, H)
        pseudo_value_grad_kernel[grid](
            k, d, beta, g_cum, t_mat, w, u_tilde, states, du, dk_acc, dd, dbeta_acc, dg_acc, d_a, layout.chunks,
            H=H, C=CHUNK, num_warps=_warps("pseudo_value_grad", m),
            num_stages=_local_stages(m, _tile_bytes(m, value=3, state=1), _tile_bytes(m, key=2, square=1)), **m)
        output_state_grad_kernel[grid](
            q, k, kx_arg, d, beta, g_cum, states, u, d_states, do, dq, dk_acc, dkx_acc, dg_acc, layout.chunks, scale,
            H=H, C=CHUNK, num_warps=_warps("output_state_grad", m),
            num_stages=_local_stages(m, _tile_bytes(m, value=2, state=2), _tile_bytes(m, key=3)), **m)
        if L > 1:
            extra_key_grad_kernel[(layout.num_chunks, H, L - 1)](
                q, k, kx, d, beta, g_cum, d_states, du, do, dd, dbeta_acc, d_b, layout.chunks, scale, H=H, C=CHUNK,
                num_warps=_warps("extra_key_grad", m),
                num_stages=_local_stages(m, _tile_bytes(m, value=3, state=1), _tile_bytes(m, key=1, square=2)), **m)
        del d_states, du  # lowers the peak: the outputs below can take their memory
        dk, dbeta = torch.empty_like(k), torch.empty_like(beta)
        dkx = torch.empty_like(kx) if kx is not None else dk
        dg = torch.empty(TT, H, dtype=ctx.g_dtype, device=q.device)
        wy_bwd_kernel[grid](
            k, kx_arg, beta, g_cum, d_a, d_b, dg_acc, dk_acc, dkx_acc, dbeta_acc, dk, dkx, dbeta, dg, layout.chunks,
            H=H, K=K, L=L, C=CHUNK, BK=m["BK"], IEEE=m["IEEE"],
            num_warps=_warps("wy_bwd" if L == 1 else "wy_bwd_extra_keys", m))
        dkx = dkx if kx is not None else None
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dd, dkx, dbeta, dg, None, dh0, None, None


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
        layout = _fixed_length_layout(B, T, q.device)
    else:
        layout = ChunkLayout(cu_seqlens.to(device=q.device, dtype=torch.int64))
    flat = [None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, d, kx, beta, g)]
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o, final = ChunkPrismFunction.apply(*flat, K**-0.5 if scale is None else scale, initial_state,
                                        output_final_state, layout)
    return o.view(B, T, H, d.shape[-1]), final
