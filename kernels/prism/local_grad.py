"""Chunk-local gradients of the PRISM chunk form (docs/PRISM.md section 4), given the forward's chunk
start state S_0, pseudo-values U~ and U, the end-state gradient dS = dL/dS_C and the pseudo-value
gradient dU from state.py's backward scan. Three kernels, each small enough to stay in registers:

- pseudo_value_grad: through U = U~ - W^ S_0, one program per (chunk, head). dW^ = -dU S_0^T and
  dR = T^T dU, the gradients of the two right-hand sides of the triangular solve: dd^1, the
  kernel-matrix gradient dA = -strict-lower(dX W^T + dR U~^T) with dX = T^T dW^, and partial dk, db1, dG.
- output_state_grad: through the output O and the end state S_C, one program per (chunk, head): dq,
  final, and partial dk, dkx and dG, for every key.
- extra_key_grad: through the right-hand side and the output and end-state values of key l = 2..L,
  one program per (chunk, head, key): dd^l, db^l and dB^l = -strict-lower(dR (W^l)^T), from the dR
  that pseudo_value_grad leaves in dU's place.

wy.py's backward finishes the partials (float32): it adds the paths through A and B^l. dG has a slot
per kernel that writes it (two), so that neither reads the other's. Transposed products are formed
from operands loaded transposed, never by transposing a product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch_config import CHUNK, PackedChunkTable, local_stages, tile_bytes, value_blocks, warps
from .tiles import cast, chunk_decay, chunk_rows, load_rows, load_rows_t, mm, operand


@dataclass
class ChunkLocalGrads:
    """What the three kernels below write: dq and dd final (their inputs' dtypes), the rest float32
    partials that wy.py's backward finishes. With L = 1 the extra-key buffers are never touched, and
    stand-ins keep every pointer valid."""

    dq: torch.Tensor      # [TT, H, K]
    dg: torch.Tensor      # [TT, H, 2] partial dG: slot 0 output_state_grad's, slot 1 pseudo_value_grad's
    dk: torch.Tensor      # [TT, H, K]
    dkx: torch.Tensor     # [TT, H, L - 1, K]
    dd: torch.Tensor      # [TT, H, L, V]
    dbeta: torch.Tensor   # [TT, H, L]
    d_a: torch.Tensor     # [TT, H, C] dA, row by row
    d_b: torch.Tensor     # [TT, H, L - 1, C] dB^l, row by row

    @classmethod
    def empty(cls, q: torch.Tensor, d: torch.Tensor) -> ChunkLocalGrads:
        TT, H, K = q.shape
        L = d.shape[-2]
        f32 = dict(dtype=torch.float32, device=q.device)
        dq = torch.empty_like(q)
        dg = torch.empty(TT, H, 2, **f32)
        dk = torch.empty(TT, H, K, **f32)
        dkx = torch.empty(TT, H, L - 1, K, **f32) if L > 1 else dk
        dd = torch.empty_like(d)
        dbeta = torch.empty(TT, H, L, **f32)
        d_a = torch.empty(TT, H, CHUNK, **f32)
        d_b = torch.empty(TT, H, L - 1, CHUNK, **f32) if L > 1 else d_a
        return cls(dq=dq, dg=dg, dk=dk, dkx=dkx, dd=dd, dbeta=dbeta, d_a=d_a, d_b=d_b)


def _blocks(q: torch.Tensor, d: torch.Tensor) -> dict:
    return dict(value_blocks(q, d.shape[-1]), L=d.shape[-2])


@triton.jit
def pseudo_value_grad_kernel(
    k, d, beta, g_cum, t_mat, w, u_tilde, states, du,
    dk, dd, dbeta, dg_acc, d_a, chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    """Writes dd^1, dA, and the first partials of dk, db1 and dG (slot 1); with extra keys, also
    dR over dU (extra_key_grad needs dR, and nothing after this kernel needs dU)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, t_end, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    state_off = (i_c.to(tl.int64) * H + i_h) * K * V
    strict = o_c[:, None] > o_c[None, :]

    b_gam = tl.where(m_c, tl.exp(tl.load(g_cum + row, mask=m_c, other=0.0)), 0.0)
    b_b1 = tl.load(beta + row * L, mask=m_c, other=0.0).to(tl.float32)
    b_Tt = tl.load(t_mat + row[None, :] * C + o_c[:, None], mask=m_c[None, :], other=0.0)

    b_dw = tl.zeros([C, BK], dtype=tl.float32)      # dW^ = -dU S_0^T
    b_dru = tl.zeros([C, C], dtype=tl.float32)      # dR U~^T
    b_db1 = tl.zeros([C], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_ht = tl.load(states + state_off + o_k[None, :] * V + o_v[:, None], mask=m_k[None, :] & m_v[:, None],
                       other=0.0)
        b_du = load_rows(du, row * V, m_c, o_v, V)
        b_dw -= mm(b_du, b_ht, IEEE)
        b_dr = mm(b_Tt, b_du, IEEE)
        if L > 1:
            tl.store(du + row[:, None] * V + o_v[None, :], cast(b_dr, du.dtype.element_ty),
                     mask=m_c[:, None] & m_v[None, :])
        b_dru += mm(b_dr, tl.trans(load_rows(u_tilde, row * V, m_c, o_v, V)), IEEE)
        b_db1 += tl.sum(b_dr * load_rows(d, row * L * V, m_c, o_v, V).to(tl.float32), 1)
        tl.store(dd + (row * L)[:, None] * V + o_v[None, :], cast(b_dr * b_b1[:, None], dd.dtype.element_ty),
                 mask=m_c[:, None] & m_v[None, :])

    # W^ = T X with X = diag(b1 gamma) K.
    b_dx = mm(b_Tt, b_dw, IEEE)
    b_bg = b_b1 * b_gam
    b_xk = tl.sum(b_dx * load_rows(k, row * K, m_c, o_k, K).to(tl.float32), 1)
    b_dA = -tl.where(strict, mm(b_dx, load_rows_t(w, row * K, m_c, o_k, K), IEEE) + b_dru, 0.0)
    tl.store(d_a + row[:, None] * C + o_c[None, :], b_dA, mask=m_c[:, None])
    tl.store(dk + row[:, None] * K + o_k[None, :], b_bg[:, None] * b_dx, mask=m_c[:, None] & m_k[None, :])
    tl.store(dbeta + row * L, b_db1 + b_xk * b_gam, mask=m_c)
    tl.store(dg_acc + row * 2 + 1, b_xk * b_bg, mask=m_c)


def pseudo_value_grad(*, k: torch.Tensor, d: torch.Tensor, beta: torch.Tensor, g_cum: torch.Tensor,
                      t_mat: torch.Tensor, w: torch.Tensor, u_tilde: torch.Tensor, states: torch.Tensor,
                      du: torch.Tensor, out: ChunkLocalGrads, table: PackedChunkTable) -> None:
    """Writes out.dd (key 1), out.d_a and the first partials of out.dk, out.dbeta (key 1) and out.dg; with
    extra keys, overwrites du with dR."""
    blocks = _blocks(k, d)
    pseudo_value_grad_kernel[(table.num_chunks, k.shape[1])](
        k=k, d=d, beta=beta, g_cum=g_cum, t_mat=t_mat, w=w, u_tilde=u_tilde, states=states, du=du,
        dk=out.dk, dd=out.dd, dbeta=out.dbeta, dg_acc=out.dg, d_a=out.d_a, chunks=table.chunks,
        H=k.shape[1], C=CHUNK, num_warps=warps("pseudo_value_grad", blocks),
        num_stages=local_stages(blocks, tile_bytes(blocks, value=3, state=1), tile_bytes(blocks, key=2, square=1)),
        **blocks)


@triton.jit
def output_state_grad_kernel(
    q, k, kx, d, beta, g_cum, states, u, d_states, do,
    dq, dk, dkx, dg_acc, chunks, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    """Output O = scale [diag(gamma) Q S_0 + (M * Q K^T) U + sum_l (M * Q (Kappa^l)^T) W^l] and end state
    S_C = gamma_C S_0 + K^T diag(gamma_C / gamma) U + sum_l (Kappa^l)^T diag(gamma_C / gamma) W^l:
    writes dq and dkx's first partial, adds to dk (after pseudo_value_grad), writes dG's slot 0."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, t_end, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_ck = m_c[:, None] & m_k[None, :]
    state_off = (i_c.to(tl.int64) * H + i_h) * K * V
    t_last = tl.minimum(t0 + C, t_end) - 1
    strict = o_c[:, None] > o_c[None, :]

    b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
    g_last = tl.load(g_cum + t_last * H + i_h)
    b_gam = tl.where(m_c, tl.exp(b_G), 0.0)
    b_dec = tl.where(m_c, tl.exp(g_last - b_G), 0.0)
    b_M = chunk_decay(b_G, m_c, True, False, C)
    b_q = load_rows(q, row * K, m_c, o_k, K)
    b_k = load_rows(k, row * K, m_c, o_k, K)

    b_dq = tl.zeros([C, BK], dtype=tl.float32)      # dO S_0^T
    b_dkst = tl.zeros([C, BK], dtype=tl.float32)    # U dS^T
    b_dP = tl.zeros([C, C], dtype=tl.float32)       # dO U^T
    b_udo = tl.zeros([C, C], dtype=tl.float32)      # U dO^T
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        kv_t = o_k[None, :] * V + o_v[:, None]
        m_kv_t = m_k[None, :] & (o_v < V)[:, None]
        b_ht = tl.load(states + state_off + kv_t, mask=m_kv_t, other=0.0)
        b_dht = tl.load(d_states + state_off + kv_t, mask=m_kv_t, other=0.0)
        b_u = load_rows(u, row * V, m_c, o_v, V)
        b_do = load_rows(do, row * V, m_c, o_v, V)
        b_dq += mm(b_do, b_ht, IEEE)
        b_dP += mm(b_do, tl.trans(b_u), IEEE)
        b_udo += mm(b_u, tl.trans(b_do), IEEE)
        b_dkst += mm(b_u, b_dht, IEEE)
        b_hdh += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)

    b_dq *= (scale * b_gam)[:, None]
    b_dG = tl.sum(b_dq * b_q.to(tl.float32), 1)
    b_dP *= scale * b_M
    # Diagonal entries (exp(G_r - G_r)) cancel between row and column sums: drop them, or they cost
    # float32 cancellation where every off-diagonal decay is tiny.
    b_z = tl.where(strict, b_dP * mm(b_q, tl.trans(b_k), IEEE), 0.0)
    b_dG += tl.sum(b_z, 1) - tl.sum(b_z, 0)
    b_dq += mm(b_dP, b_k, IEEE)
    b_dk = mm(b_udo * chunk_decay(b_G, m_c, False, False, C) * scale, b_q, IEEE)
    b_dkst *= b_dec[:, None]
    b_z = tl.where(tok == t_last, 0.0, tl.sum(b_dkst * b_k.to(tl.float32), 1))  # the last row's decay is exp(0)
    b_dG += tl.where(tok == t_last, tl.sum(b_z, 0) + tl.exp(g_last) * tl.sum(b_hdh, 0), 0.0) - b_z
    b_dk += b_dkst + tl.load(dk + row[:, None] * K + o_k[None, :], mask=m_ck, other=0.0)
    tl.store(dk + row[:, None] * K + o_k[None, :], b_dk, mask=m_ck)

    # The extra keys' output and end-state terms, one key at a time.
    for l in tl.static_range(1, L):
        x_row = row * (L - 1) + l - 1
        b_kx = load_rows(kx, x_row * K, m_c, o_k, K)
        b_bl = tl.load(beta + row * L + l, mask=m_c, other=0.0).to(tl.float32)
        b_dPl = tl.zeros([C, C], dtype=tl.float32)      # dO (W^l)^T
        b_wdo = tl.zeros([C, C], dtype=tl.float32)      # W^l dO^T
        b_dkxst = tl.zeros([C, BK], dtype=tl.float32)   # W^l dS^T
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            b_wl = load_rows(d, (row * L + l) * V, m_c, o_v, V).to(tl.float32) * b_bl[:, None]
            b_do = load_rows(do, row * V, m_c, o_v, V)
            b_dht = tl.load(d_states + state_off + o_k[None, :] * V + o_v[:, None],
                            mask=m_k[None, :] & (o_v < V)[:, None], other=0.0)
            b_dPl += mm(b_do, tl.trans(b_wl), IEEE)
            b_wdo += mm(b_wl, tl.trans(b_do), IEEE)
            b_dkxst += mm(b_wl, b_dht, IEEE)
        b_dPl *= scale * b_M
        b_z = tl.where(strict, b_dPl * mm(b_q, tl.trans(b_kx), IEEE), 0.0)
        b_dG += tl.sum(b_z, 1) - tl.sum(b_z, 0)
        b_dq += mm(b_dPl, b_kx, IEEE)
        b_dkxst *= b_dec[:, None]
        b_z = tl.where(tok == t_last, 0.0, tl.sum(b_dkxst * b_kx.to(tl.float32), 1))
        b_dG += tl.where(tok == t_last, tl.sum(b_z, 0), 0.0) - b_z
        b_dkx = mm(b_wdo * chunk_decay(b_G, m_c, False, False, C) * scale, b_q, IEEE) + b_dkxst
        tl.store(dkx + x_row[:, None] * K + o_k[None, :], b_dkx, mask=m_ck)
    tl.store(dq + row[:, None] * K + o_k[None, :], cast(b_dq, dq.dtype.element_ty), mask=m_ck)
    tl.store(dg_acc + row * 2, b_dG, mask=m_c)


def output_state_grad(*, q: torch.Tensor, k: torch.Tensor, kx: torch.Tensor | None, d: torch.Tensor,
                      beta: torch.Tensor, g_cum: torch.Tensor, states: torch.Tensor, u: torch.Tensor,
                      d_states: torch.Tensor, do: torch.Tensor, scale: float, out: ChunkLocalGrads,
                      table: PackedChunkTable) -> None:
    """Writes out.dq and out.dkx's first partial, adds to out.dk (after pseudo_value_grad), writes out.dg's
    slot 0."""
    blocks = _blocks(q, d)
    output_state_grad_kernel[(table.num_chunks, q.shape[1])](
        q=q, k=k, kx=k if kx is None else kx, d=d, beta=beta, g_cum=g_cum, states=states, u=u, d_states=d_states,
        do=do, dq=out.dq, dk=out.dk, dkx=out.dkx, dg_acc=out.dg, chunks=table.chunks, scale=scale,
        H=q.shape[1], C=CHUNK, num_warps=warps("output_state_grad", blocks),
        num_stages=local_stages(blocks, tile_bytes(blocks, value=2, state=2), tile_bytes(blocks, key=3)), **blocks)


@triton.jit
def extra_key_grad_kernel(
    q, k, kx, d, beta, g_cum, d_states, d_r, do,
    dd, dbeta, d_b, chunks, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    """Key l = 2..L: the gradient dW^l of W^l = diag(b^l) D^l, which enters the output as
    (M * Q (Kappa^l)^T) W^l, the end state as (Kappa^l)^T diag(gamma_C/gamma) W^l and the triangular
    solve's right-hand side as -B^l W^l; d_r holds dR = T^T dU."""
    i_c, i_h, l = tl.program_id(0), tl.program_id(1), tl.program_id(2) + 1
    t0, t_end, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    x_row = row * (L - 1) + l - 1
    state_off = (i_c.to(tl.int64) * H + i_h) * K * V
    t_last = tl.minimum(t0 + C, t_end) - 1
    strict = o_c[:, None] > o_c[None, :]

    b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
    b_dec = tl.where(m_c, tl.exp(tl.load(g_cum + t_last * H + i_h) - b_G), 0.0)
    b_b1 = tl.load(beta + row * L, mask=m_c, other=0.0).to(tl.float32)
    b_bl = tl.load(beta + row * L + l, mask=m_c, other=0.0).to(tl.float32)
    b_kx = load_rows(kx, x_row * K, m_c, o_k, K)
    # Held across the value loop as product operands only: in their rounded precision, half the registers.
    b_plt = operand(chunk_decay(b_G, m_c, False, False, C) * mm(b_kx, tl.trans(load_rows(q, row * K, m_c, o_k, K)),
                                                                 IEEE), IEEE)
    b_blt = operand(chunk_decay(b_G, m_c, False, True, C) * b_b1[None, :] * mm(
        b_kx, tl.trans(load_rows(k, row * K, m_c, o_k, K)), IEEE), IEEE)

    b_dBl = tl.zeros([C, C], dtype=tl.float32)     # dR (W^l)^T
    b_dbl = tl.zeros([C], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_dh = tl.load(d_states + state_off + o_k[:, None] * V + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dl = load_rows(d, (row * L + l) * V, m_c, o_v, V).to(tl.float32)
        b_dr = load_rows(d_r, row * V, m_c, o_v, V)
        b_dBl += mm(b_dr, tl.trans(b_dl * b_bl[:, None]), IEEE)
        b_dwl = (scale * mm(b_plt, load_rows(do, row * V, m_c, o_v, V), IEEE)
                 + b_dec[:, None] * mm(b_kx, b_dh, IEEE) - mm(b_blt, b_dr, IEEE))
        b_dbl += tl.sum(b_dwl * b_dl, 1)
        tl.store(dd + (row * L + l)[:, None] * V + o_v[None, :],
                 cast(b_dwl * b_bl[:, None], dd.dtype.element_ty), mask=m_c[:, None] & m_v[None, :])
    tl.store(dbeta + row * L + l, b_dbl, mask=m_c)
    tl.store(d_b + x_row[:, None] * C + o_c[None, :], -tl.where(strict, b_dBl, 0.0), mask=m_c[:, None])


def extra_key_grad(*, q: torch.Tensor, k: torch.Tensor, kx: torch.Tensor | None, d: torch.Tensor,
                   beta: torch.Tensor, g_cum: torch.Tensor, d_states: torch.Tensor, d_r: torch.Tensor,
                   do: torch.Tensor, scale: float, out: ChunkLocalGrads, table: PackedChunkTable) -> None:
    """Writes out.dd, out.dbeta and out.d_b of keys 2..L (nothing with L = 1); d_r is the dR that
    pseudo_value_grad left in dU's place."""
    blocks = _blocks(q, d)
    L = blocks["L"]
    if L == 1:
        return
    extra_key_grad_kernel[(table.num_chunks, q.shape[1], L - 1)](
        q=q, k=k, kx=kx, d=d, beta=beta, g_cum=g_cum, d_states=d_states, d_r=d_r, do=do,
        dd=out.dd, dbeta=out.dbeta, d_b=out.d_b, chunks=table.chunks, scale=scale, H=q.shape[1], C=CHUNK,
        num_warps=warps("extra_key_grad", blocks),
        num_stages=local_stages(blocks, tile_bytes(blocks, value=3, state=1), tile_bytes(blocks, key=1, square=2)),
        **blocks)
