"""Chunk-local WY representation (PRISM.md section 4) and its backward.

Forward, per chunk and head: the chunk-local log-decay cumsum G, A = strict-lower(b1 M K K^T),
T = (I + A)^-1 (block forward substitution), W^ = T diag(b1 gamma) K and the state-independent
pseudo-values U~ = T (W^1 - sum_l B^l W^l), B^l = strict-lower(b1 M K (Kappa^l)^T).

Backward: given dA and dB^l (from local_grad.py), the gradients that flow through the kernel
matrices A and B^l into k, kx, b1 and G, then dg as the reverse cumsum of dG.
"""
import triton
import triton.language as tl

from .tiles import chunk_decay, chunk_rows, load_rows, mm, mm_bf16


@triton.jit
def unit_lower_inverse(b_A, C: tl.constexpr):
    """(I + A)^-1 for strictly lower-triangular A [C, C]. The 16 x 16 diagonal blocks D are inverted
    by forward substitution, all four at once; with F = D^-1 E (E the blocks below the diagonal,
    F^4 = 0), (I + A)^-1 = (I + F)^-1 D^-1 = (I - F)(I + F^2) D^-1."""
    o = tl.arange(0, C)
    same = (o // 16)[:, None] == (o // 16)[None, :]
    eye = (o[:, None] == o[None, :]).to(tl.float32)
    b_Ad = tl.where(same, b_A, 0.0)
    # Rows of N = D^-1 - I in order: N_i = -A_i - A_i N (rows above i are final, A_ij = 0 for j >= i);
    # the selected rows of different blocks touch disjoint columns, so one pass serves all blocks.
    b_N = tl.zeros([C, C], dtype=tl.float32)
    for i in range(1, 16):
        sel = (o % 16 == i)[:, None]
        b_a = tl.sum(tl.where(sel, b_Ad, 0.0), 0)
        b_row = -b_a - tl.sum(b_a[:, None] * b_N, 0)
        b_N = tl.where(sel & same, b_row[None, :], b_N)
    b_Dinv = b_N + eye
    b_F = mm(b_Dinv, tl.where(same, 0.0, b_A), True)
    return mm(eye - b_F, mm(eye + mm(b_F, b_F, True), b_Dinv, True), True)


@triton.jit
def wy_fwd_kernel(
    k, kx, d, beta, g, g_cum, t_mat, w, u_tilde, chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)

    b_G = tl.cumsum(tl.load(g + row, mask=m_c, other=0.0).to(tl.float32), 0)
    tl.store(g_cum + row, b_G, mask=m_c)
    b_k = load_rows(k, row * K, m_c, o_k, K)
    b_b1 = tl.load(beta + row * L, mask=m_c, other=0.0).to(tl.float32)
    b_Ms = chunk_decay(b_G, m_c, True, True, C) * b_b1[:, None]
    b_A = b_Ms * mm(b_k, tl.trans(b_k), IEEE)

    b_T = unit_lower_inverse(b_A, C)
    tl.store(t_mat + row[:, None] * C + o_c[None, :], b_T, mask=m_c[:, None])

    b_x = b_k * (b_b1 * tl.exp(b_G))[:, None]
    b_w = mm(b_T, b_x, IEEE)
    tl.store(w + row[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m_c[:, None] & (o_k < K)[None, :])

    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_r = load_rows(d, row * L * V, m_c, o_v, V) * b_b1[:, None]
        for l in tl.static_range(1, L):
            b_kx = load_rows(kx, (row * (L - 1) + l - 1) * K, m_c, o_k, K)
            b_bl = tl.load(beta + row * L + l, mask=m_c, other=0.0).to(tl.float32)
            b_wl = load_rows(d, (row * L + l) * V, m_c, o_v, V) * b_bl[:, None]
            b_r -= mm(b_Ms * mm(b_k, tl.trans(b_kx), IEEE), b_wl, IEEE)
        b_ut = mm(b_T, b_r, IEEE)
        tl.store(u_tilde + row[:, None] * V + o_v[None, :], b_ut.to(u_tilde.dtype.element_ty),
                 mask=m_c[:, None] & (o_v < V)[None, :])


@triton.jit
def wy_bwd_kernel(
    k, kx, beta, g_cum, d_a, d_b, dq_acc, dg_acc, dk, dkx, dbeta, dq, dg, chunks,
    H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    """Adds the A and B^l paths to the float32 partial gradients dk, dkx, dbeta[..., 0] in place, sums
    the per-key partials of dq and dG, and turns dG into dg."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    m_ck = m_c[:, None] & (o_k < K)[None, :]

    b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
    b_b1 = tl.load(beta + row * L, mask=m_c, other=0.0).to(tl.float32)
    b_Ms = chunk_decay(b_G, m_c, True, True, C)
    b_Mst = chunk_decay(b_G, m_c, False, True, C)
    b_k = load_rows(k, row * K, m_c, o_k, K)

    # A = b1 M K K^T: dA/dk_r = sum_i Y_ri k_i, dA/dk_i = sum_r Y_ri k_r with Y = dA M b1.
    b_dA = tl.load(d_a + row[:, None] * C + o_c[None, :], mask=m_c[:, None], other=0.0)
    b_dAt = tl.load(d_a + row[None, :] * C + o_c[:, None], mask=m_c[None, :], other=0.0)
    b_y = b_dA * b_Ms * b_b1[:, None]
    b_yt = b_dAt * b_Mst * b_b1[None, :]
    b_kk = mm_bf16(b_k, tl.trans(b_k), IEEE)
    b_dk = tl.load(dk + row[:, None] * K + o_k[None, :], mask=m_ck, other=0.0)
    b_dk += mm_bf16(b_y, b_k, IEEE) + mm_bf16(b_yt, b_k, IEEE)
    b_z = b_y * b_kk
    b_dG = tl.sum(b_z, 1) - tl.sum(b_z, 0)
    b_dq = tl.zeros([C, BK], dtype=tl.float32)
    for l in tl.static_range(L):
        b_dG += tl.load(dg_acc + row * L + l, mask=m_c, other=0.0)
        b_dq += tl.load(dq_acc + (row * L + l)[:, None] * K + o_k[None, :], mask=m_ck, other=0.0)
    tl.store(dq + row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_ck)
    b_db1 = tl.sum(b_dA * b_Ms * b_kk, 1)

    for l in tl.static_range(1, L):
        x_row = row * (L - 1) + l - 1
        b_kx = load_rows(kx, x_row * K, m_c, o_k, K)
        b_dB = tl.load(d_b + x_row[:, None] * C + o_c[None, :], mask=m_c[:, None], other=0.0)
        b_dBt = tl.load(d_b + x_row[None, :] * C + o_c[:, None], mask=m_c[None, :], other=0.0)
        b_y = b_dB * b_Ms * b_b1[:, None]
        b_yt = b_dBt * b_Mst * b_b1[None, :]
        b_kkx = mm_bf16(b_k, tl.trans(b_kx), IEEE)
        b_dk += mm_bf16(b_y, b_kx, IEEE)
        b_dkx = tl.load(dkx + x_row[:, None] * K + o_k[None, :], mask=m_ck, other=0.0) + mm_bf16(b_yt, b_k, IEEE)
        tl.store(dkx + x_row[:, None] * K + o_k[None, :], b_dkx, mask=m_ck)
        b_z = b_y * b_kkx
        b_dG += tl.sum(b_z, 1) - tl.sum(b_z, 0)
        b_db1 += tl.sum(b_dB * b_Ms * b_kkx, 1)

    tl.store(dk + row[:, None] * K + o_k[None, :], b_dk, mask=m_ck)
    b_db1 += tl.load(dbeta + row * L, mask=m_c, other=0.0)
    tl.store(dbeta + row * L, b_db1, mask=m_c)
    # G_r = sum_{j <= r} g_j within the chunk, so dg_j = sum_{r >= j} dG_r.
    b_dg = tl.cumsum(b_dG, 0, reverse=True)
    tl.store(dg + row, b_dg, mask=m_c)
