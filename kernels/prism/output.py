"""The chunk output (docs/PRISM.md section 4), one program per (chunk, head, block of value columns):

    O = scale [diag(gamma) Q S_0 + (M * Q K^T) U + sum_l (M * Q (Kappa^l)^T) b^l D^l]

with M the inclusive lower-triangular decay matrix.
"""
import torch
import triton
import triton.language as tl

from .launch_config import CHUNK, PackedChunkTable, value_blocks, warps, wide_values
from .tiles import cast, chunk_decay, chunk_rows, load_rows, mm, state_tile


@triton.jit
def output_fwd_kernel(
    q, k, kx, d, beta, g_cum, states, u, o, chunks, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
    b_M = chunk_decay(b_G, m_c, True, False, C)
    b_q = load_rows(q, row * K, m_c, o_k, K)
    kv, m_kv = state_tile(i_v, K, V, BK, BV)
    b_h = tl.load(states + (i_c.to(tl.int64) * H + i_h) * K * V + kv, mask=m_kv, other=0.0)
    b_o = mm(b_q, b_h, IEEE) * tl.exp(b_G)[:, None]
    b_p = b_M * mm(b_q, tl.trans(load_rows(k, row * K, m_c, o_k, K)), IEEE)
    b_o += mm(b_p, load_rows(u, row * V, m_c, o_v, V), IEEE)
    for l in tl.static_range(1, L):
        b_kx = load_rows(kx, (row * (L - 1) + l - 1) * K, m_c, o_k, K)
        b_bl = tl.load(beta + row * L + l, mask=m_c, other=0.0).to(tl.float32)
        b_wl = load_rows(d, (row * L + l) * V, m_c, o_v, V) * b_bl[:, None]
        b_o += mm(b_M * mm(b_q, tl.trans(b_kx), IEEE), b_wl, IEEE)
    tl.store(o + row[:, None] * V + o_v[None, :], cast(b_o * scale, o.dtype.element_ty),
             mask=m_c[:, None] & m_v[None, :])


def output_fwd(*, q: torch.Tensor, k: torch.Tensor, kx: torch.Tensor | None, d: torch.Tensor, beta: torch.Tensor,
               g_cum: torch.Tensor, states: torch.Tensor, u: torch.Tensor, scale: float,
               table: PackedChunkTable) -> torch.Tensor:
    """O (the input dtype), per token and head."""
    TT, H, _ = q.shape
    L, V = d.shape[-2], d.shape[-1]
    o = torch.empty(TT, H, V, dtype=q.dtype, device=q.device)
    blocks = value_blocks(q, V)
    # Q K^T and the Q (Kappa^l)^T are formed once per value block.
    wide = wide_values(blocks)
    output_fwd_kernel[(table.num_chunks, H, triton.cdiv(V, wide["BV"]))](
        q=q, k=k, kx=k if kx is None else kx, d=d, beta=beta, g_cum=g_cum, states=states, u=u, o=o,
        chunks=table.chunks, scale=scale, H=H, L=L, C=CHUNK, num_warps=warps("output", blocks), **wide)
    return o
