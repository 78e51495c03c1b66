"""Chunk-local WY representation (docs/PRISM.md section 4) and its backward.

Forward, per chunk and head, from T = (I + A)^-1 (solve.py): W^ = T diag(b1 gamma) K and the
state-independent pseudo-values U~ = T (W^1 - sum_l B^l W^l), B^l = strict-lower(b1 M K (Kappa^l)^T).

Backward: given dA and dB^l (from local_grad.py), the gradients that flow through the kernel
matrices A and B^l into k, kx, b1 and G, then dg as the reverse cumsum of dG.
"""
import torch
import triton
import triton.language as tl

from .launch_config import CHUNK, PackedChunkTable, key_blocks, stages, tile_bytes, value_blocks, warps, wide_values
from .local_grad import ChunkLocalGrads
from .tiles import cast, chunk_decay, chunk_rows, load_rows, mm


@triton.jit
def wy_fwd_kernel(
    k, kx, d, beta, g_cum, t_mat, w, u_tilde, chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)

    b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
    b_T = tl.load(t_mat + row[:, None] * C + o_c[None, :], mask=m_c[:, None], other=0.0)
    b_k = load_rows(k, row * K, m_c, o_k, K)
    b_b1 = tl.load(beta + row * L, mask=m_c, other=0.0).to(tl.float32)
    b_w = mm(b_T, b_k.to(tl.float32) * (b_b1 * tl.exp(b_G))[:, None], IEEE)
    tl.store(w + row[:, None] * K + o_k[None, :], cast(b_w, w.dtype.element_ty),
             mask=m_c[:, None] & (o_k < K)[None, :])

    b_Ms = chunk_decay(b_G, m_c, True, True, C) * b_b1[:, None]
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_r = load_rows(d, row * L * V, m_c, o_v, V).to(tl.float32) * b_b1[:, None]
        for l in tl.static_range(1, L):
            b_kx = load_rows(kx, (row * (L - 1) + l - 1) * K, m_c, o_k, K)
            b_bl = tl.load(beta + row * L + l, mask=m_c, other=0.0).to(tl.float32)
            b_wl = load_rows(d, (row * L + l) * V, m_c, o_v, V).to(tl.float32) * b_bl[:, None]
            b_r -= mm(b_Ms * mm(b_k, tl.trans(b_kx), IEEE), b_wl, IEEE)
        b_ut = mm(b_T, b_r, IEEE)
        tl.store(u_tilde + row[:, None] * V + o_v[None, :], cast(b_ut, u_tilde.dtype.element_ty),
                 mask=m_c[:, None] & (o_v < V)[None, :])


def wy_fwd(*, k: torch.Tensor, kx: torch.Tensor | None, d: torch.Tensor, beta: torch.Tensor, g_cum: torch.Tensor,
           t_mat: torch.Tensor, table: PackedChunkTable) -> tuple[torch.Tensor, torch.Tensor]:
    """W^ and U~ (the input dtype), per token and head."""
    TT, H, K = k.shape
    L, V = d.shape[-2], d.shape[-1]
    w = torch.empty(TT, H, K, dtype=k.dtype, device=k.device)
    u_tilde = torch.empty(TT, H, V, dtype=k.dtype, device=k.device)
    # The extra keys' kernel matrices B^l are formed once per value block.
    blocks = wide_values(value_blocks(k, V))
    # Per value block: the extra keys and the L directions, plus k and the float32 right-hand side.
    stage_bytes = tile_bytes(blocks, key=L + 1, value=L) + 4 * CHUNK * blocks["BV"]
    wy_fwd_kernel[(table.num_chunks, H)](
        k=k, kx=k if kx is None else kx, d=d, beta=beta, g_cum=g_cum, t_mat=t_mat, w=w, u_tilde=u_tilde,
        chunks=table.chunks, H=H, L=L, C=CHUNK, num_warps=warps("wy_fwd", blocks), num_stages=stages(stage_bytes),
        **blocks)
    return w, u_tilde


@triton.jit
def wy_bwd_kernel(
    k, kx, beta, g_cum, d_a, d_b, dg_acc, dk_acc, dkx_acc, dbeta_acc, dk, dkx, dbeta, dg, chunks,
    H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    """Adds the A and B^l paths to the float32 partial gradients of k, kx and b1; sums the partials of
    dG, turns dG into dg, and writes every gradient in its input's dtype."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    m_ck = m_c[:, None] & (o_k < K)[None, :]

    b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
    b_b1 = tl.load(beta + row * L, mask=m_c, other=0.0).to(tl.float32)
    b_Ms = chunk_decay(b_G, m_c, True, True, C)
    b_k = load_rows(k, row * K, m_c, o_k, K)

    # A = diag(b1) (M * K K^T). With X = dA * M and Y = diag(b1) X: dk = (Y + Y^T) K, db1 = rowsum(X * K K^T),
    # and G_r enters as +rows and -columns of Y * K K^T. Y^T is an operand transposed, not a product.
    b_x = tl.load(d_a + row[:, None] * C + o_c[None, :], mask=m_c[:, None], other=0.0) * b_Ms
    b_y = b_x * b_b1[:, None]
    b_kk = mm(b_k, tl.trans(b_k), IEEE)
    b_dk = tl.load(dk_acc + row[:, None] * K + o_k[None, :], mask=m_ck, other=0.0)
    b_dk += mm(b_y, b_k, IEEE) + mm(tl.trans(b_y), b_k, IEEE)
    b_z = b_y * b_kk
    b_dG = tl.sum(b_z, 1) - tl.sum(b_z, 0)
    b_dG += tl.load(dg_acc + row * 2, mask=m_c, other=0.0) + tl.load(dg_acc + row * 2 + 1, mask=m_c, other=0.0)
    b_db1 = tl.sum(b_x * b_kk, 1)

    # B^l = diag(b1) (M * K (Kappa^l)^T), the same way: dk += Y_l Kappa^l, dkappa^l = Y_l^T K.
    for l in tl.static_range(1, L):
        x_row = row * (L - 1) + l - 1
        b_kx = load_rows(kx, x_row * K, m_c, o_k, K)
        b_x = tl.load(d_b + x_row[:, None] * C + o_c[None, :], mask=m_c[:, None], other=0.0) * b_Ms
        b_y = b_x * b_b1[:, None]
        b_kkx = mm(b_k, tl.trans(b_kx), IEEE)
        b_dk += mm(b_y, b_kx, IEEE)
        b_dkx = tl.load(dkx_acc + x_row[:, None] * K + o_k[None, :], mask=m_ck, other=0.0)
        b_dkx += mm(tl.trans(b_y), b_k, IEEE)
        tl.store(dkx + x_row[:, None] * K + o_k[None, :], cast(b_dkx, dkx.dtype.element_ty), mask=m_ck)
        b_dbl = tl.load(dbeta_acc + row * L + l, mask=m_c, other=0.0)
        tl.store(dbeta + row * L + l, cast(b_dbl, dbeta.dtype.element_ty), mask=m_c)
        b_z = b_y * b_kkx
        b_dG += tl.sum(b_z, 1) - tl.sum(b_z, 0)
        b_db1 += tl.sum(b_x * b_kkx, 1)

    tl.store(dk + row[:, None] * K + o_k[None, :], cast(b_dk, dk.dtype.element_ty), mask=m_ck)
    b_db1 += tl.load(dbeta_acc + row * L, mask=m_c, other=0.0)
    tl.store(dbeta + row * L, cast(b_db1, dbeta.dtype.element_ty), mask=m_c)
    # G_r = sum_{j <= r} g_j within the chunk, so dg_j = sum_{r >= j} dG_r.
    b_dg = tl.cumsum(b_dG, 0, reverse=True)
    tl.store(dg + row, cast(b_dg, dg.dtype.element_ty), mask=m_c)


def wy_bwd(*, k: torch.Tensor, kx: torch.Tensor | None, beta: torch.Tensor, g_cum: torch.Tensor,
           partial: ChunkLocalGrads, g_dtype: torch.dtype, table: PackedChunkTable):
    """dk, dkx (None without extra keys), dbeta and dg in their inputs' dtypes, from local_grad.py's partials."""
    TT, H, _ = k.shape
    L = beta.shape[-1]
    dk, dbeta = torch.empty_like(k), torch.empty_like(beta)
    dkx = torch.empty_like(kx) if kx is not None else dk  # with L = 1 a stand-in that keeps the pointer valid
    dg = torch.empty(TT, H, dtype=g_dtype, device=k.device)
    blocks = key_blocks(k)
    wy_bwd_kernel[(table.num_chunks, H)](
        k=k, kx=k if kx is None else kx, beta=beta, g_cum=g_cum, d_a=partial.d_a, d_b=partial.d_b,
        dg_acc=partial.dg, dk_acc=partial.dk, dkx_acc=partial.dkx, dbeta_acc=partial.dbeta,
        dk=dk, dkx=dkx, dbeta=dbeta, dg=dg, chunks=table.chunks, H=H, L=L, C=CHUNK,
        num_warps=warps("wy_bwd" if L == 1 else "wy_bwd_extra_keys", blocks), **blocks)
    return dk, dkx if kx is not None else None, dbeta, dg
