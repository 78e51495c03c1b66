"""The chunk-local triangular system of docs/PRISM.md section 4, once per forward (the backward reuses it):
per chunk and head, the log-decay cumsum G and T = (I + A)^-1 with A = strict-lower(b1 M K K^T).

The chunk of 64 rows is handled as 4 x 4 blocks of 16: the ten blocks of A on and below the
diagonal are formed directly, the four diagonal blocks inverted by forward substitution, and the
blocks below the diagonal of T merged from them with small products,

    T_ij = -T_ii sum_{j <= m < i} A_im T_mj     (i > j),

which costs a fraction of inverting the 64 x 64 matrix as a whole.
"""
import torch
import triton
import triton.language as tl

from .launch_config import CHUNK, PackedChunkTable, key_blocks, warps
from .tiles import cast, chunk_rows, mm, mm_tf32

SUB = tl.constexpr(16)  # rows of a block; the chunk is 4 blocks


@triton.jit
def _block_rows(k, g, beta, row0, t_end, i_h, i_blk,
                H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """Block i_blk's rows: their [token, head] rows, validity, keys, b1 and raw log decays."""
    tok = row0 + i_blk * SUB + tl.arange(0, SUB)
    m = tok < t_end
    row = tok * H + i_h
    o_k = tl.arange(0, BK)
    b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m[:, None] & (o_k < K)[None, :], other=0.0)
    b_b1 = tl.load(beta + row * L, mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(g + row, mask=m, other=0.0).to(tl.float32)
    return row, m, b_k, b_b1, b_g


@triton.jit
def _a_block(b_ki, b_kj, b_Gi, b_Gj, b_b1i, m_i, m_j, DIAG: tl.constexpr, IEEE: tl.constexpr):
    """Block (i, j) of A = b1 M K K^T: strictly lower on the diagonal, zero on rows or columns past
    the sequence end (their G is not a decay and could overflow exp)."""
    o = tl.arange(0, SUB)
    keep = m_i[:, None] & m_j[None, :]
    if DIAG:
        keep = keep & (o[:, None] > o[None, :])
    decay = tl.exp(tl.where(keep, b_Gi[:, None] - b_Gj[None, :], 0.0))
    return tl.where(keep, mm(b_ki, tl.trans(b_kj), IEEE) * decay * b_b1i[:, None], 0.0)


@triton.jit
def _unit_lower_inverse_16(b_A):
    """(I + A)^-1 of a strictly lower-triangular 16 x 16 block, row by row: with N = (I + A)^-1 - I,
    N_i = -A_i - A_i N (rows above i are final and A_ij = 0 for j >= i)."""
    o = tl.arange(0, SUB)
    b_N = tl.zeros([SUB, SUB], dtype=tl.float32)
    for i in range(1, SUB):
        sel = (o == i)[:, None]
        b_a = tl.sum(tl.where(sel, b_A, 0.0), 0)
        b_N = tl.where(sel, (-b_a - tl.sum(b_a[:, None] * b_N, 0))[None, :], b_N)
    return b_N + (o[:, None] == o[None, :]).to(tl.float32)


@triton.jit
def _store_block(t_mat, row, m, j: tl.constexpr, b_T, C: tl.constexpr):
    o = tl.arange(0, SUB)
    cols = o + j * SUB
    tl.store(t_mat + row[:, None] * C + cols[None, :], cast(b_T, t_mat.dtype.element_ty), mask=m[:, None])


@triton.jit
def solve_kernel(
    k, beta, g, g_cum, t_mat, chunks,
    H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    """One program per (chunk, head): stores G (float32) and T [C, C] per row (the input dtype)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, t_end, _, _, _ = chunk_rows(chunks, i_c, i_h, H, C)
    r0, m0, b_k0, b_b0, b_g0 = _block_rows(k, g, beta, t0, t_end, i_h, 0, H, K, L, BK)
    r1, m1, b_k1, b_b1, b_g1 = _block_rows(k, g, beta, t0, t_end, i_h, 1, H, K, L, BK)
    r2, m2, b_k2, b_b2, b_g2 = _block_rows(k, g, beta, t0, t_end, i_h, 2, H, K, L, BK)
    r3, m3, b_k3, b_b3, b_g3 = _block_rows(k, g, beta, t0, t_end, i_h, 3, H, K, L, BK)
    # G over the whole chunk, block by block: each block's cumsum plus the totals before it.
    b_G0 = tl.cumsum(b_g0, 0)
    b_G1 = tl.cumsum(b_g1, 0) + tl.sum(b_g0, 0)
    b_G2 = tl.cumsum(b_g2, 0) + tl.sum(b_g0, 0) + tl.sum(b_g1, 0)
    b_G3 = tl.cumsum(b_g3, 0) + tl.sum(b_g0, 0) + tl.sum(b_g1, 0) + tl.sum(b_g2, 0)
    tl.store(g_cum + r0, b_G0, mask=m0)
    tl.store(g_cum + r1, b_G1, mask=m1)
    tl.store(g_cum + r2, b_G2, mask=m2)
    tl.store(g_cum + r3, b_G3, mask=m3)

    b_T00 = _unit_lower_inverse_16(_a_block(b_k0, b_k0, b_G0, b_G0, b_b0, m0, m0, True, IEEE))
    b_T11 = _unit_lower_inverse_16(_a_block(b_k1, b_k1, b_G1, b_G1, b_b1, m1, m1, True, IEEE))
    b_T22 = _unit_lower_inverse_16(_a_block(b_k2, b_k2, b_G2, b_G2, b_b2, m2, m2, True, IEEE))
    b_T33 = _unit_lower_inverse_16(_a_block(b_k3, b_k3, b_G3, b_G3, b_b3, m3, m3, True, IEEE))
    b_A10 = _a_block(b_k1, b_k0, b_G1, b_G0, b_b1, m1, m0, False, IEEE)
    b_A20 = _a_block(b_k2, b_k0, b_G2, b_G0, b_b2, m2, m0, False, IEEE)
    b_A21 = _a_block(b_k2, b_k1, b_G2, b_G1, b_b2, m2, m1, False, IEEE)
    b_A30 = _a_block(b_k3, b_k0, b_G3, b_G0, b_b3, m3, m0, False, IEEE)
    b_A31 = _a_block(b_k3, b_k1, b_G3, b_G1, b_b3, m3, m1, False, IEEE)
    b_A32 = _a_block(b_k3, b_k2, b_G3, b_G2, b_b3, m3, m2, False, IEEE)

    b_T10 = -mm_tf32(b_T11, mm_tf32(b_A10, b_T00, IEEE), IEEE)
    b_T21 = -mm_tf32(b_T22, mm_tf32(b_A21, b_T11, IEEE), IEEE)
    b_T32 = -mm_tf32(b_T33, mm_tf32(b_A32, b_T22, IEEE), IEEE)
    b_T20 = -mm_tf32(b_T22, mm_tf32(b_A20, b_T00, IEEE) + mm_tf32(b_A21, b_T10, IEEE), IEEE)
    b_T31 = -mm_tf32(b_T33, mm_tf32(b_A31, b_T11, IEEE) + mm_tf32(b_A32, b_T21, IEEE), IEEE)
    b_T30 = -mm_tf32(b_T33, mm_tf32(b_A30, b_T00, IEEE) + mm_tf32(b_A31, b_T10, IEEE)
                     + mm_tf32(b_A32, b_T20, IEEE), IEEE)

    zero = tl.zeros([SUB, SUB], dtype=tl.float32)
    _store_block(t_mat, r0, m0, 0, b_T00, C)
    _store_block(t_mat, r0, m0, 1, zero, C)
    _store_block(t_mat, r0, m0, 2, zero, C)
    _store_block(t_mat, r0, m0, 3, zero, C)
    _store_block(t_mat, r1, m1, 0, b_T10, C)
    _store_block(t_mat, r1, m1, 1, b_T11, C)
    _store_block(t_mat, r1, m1, 2, zero, C)
    _store_block(t_mat, r1, m1, 3, zero, C)
    _store_block(t_mat, r2, m2, 0, b_T20, C)
    _store_block(t_mat, r2, m2, 1, b_T21, C)
    _store_block(t_mat, r2, m2, 2, b_T22, C)
    _store_block(t_mat, r2, m2, 3, zero, C)
    _store_block(t_mat, r3, m3, 0, b_T30, C)
    _store_block(t_mat, r3, m3, 1, b_T31, C)
    _store_block(t_mat, r3, m3, 2, b_T32, C)
    _store_block(t_mat, r3, m3, 3, b_T33, C)


def solve_fwd(*, k: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
              table: PackedChunkTable) -> tuple[torch.Tensor, torch.Tensor]:
    """G (float32) and T (the input dtype), per token and head."""
    TT, H, _ = k.shape
    blocks = key_blocks(k)
    g_cum = torch.empty(TT, H, dtype=torch.float32, device=k.device)
    t_mat = torch.empty(TT, H, CHUNK, dtype=k.dtype, device=k.device)
    solve_kernel[(table.num_chunks, H)](
        k=k, beta=beta, g=g, g_cum=g_cum, t_mat=t_mat, chunks=table.chunks, H=H, L=beta.shape[-1], C=CHUNK,
        num_warps=warps("solve", blocks), **blocks)
    return g_cum, t_mat
