"""The inter-chunk state scan and its backward (docs/PRISM.md section 4), one program per
(sequence, head, block of value columns); the state's value columns evolve independently.

Forward, chunk by chunk: store S_0, then U = U~ - W^ S_0 and
S_C = gamma_C S_0 + K^T diag(gamma_C/gamma) U + sum_l (Kappa^l)^T diag(gamma_C/gamma) b^l D^l.
(The extra keys' term does not depend on the state, but these L - 1 products, whose loads the
pipeliner issues ahead, cost less than forming it in a parallel kernel and reading it back as a
float32 [K, V] tile per chunk: docs/PERFORMANCE.md.)

Backward, last chunk first, with dS = dL/dS_C: store dS, then the total pseudo-value gradient
dU = dU_local + diag(gamma_C/gamma) K dS, and dS_0 = gamma_C dS + scale (diag(gamma) Q)^T dO - W^T dU.
The output's part dU_local = scale (M^T * K Q^T) dO does not depend on the state: du_local_kernel forms
it for every chunk in parallel, as fla does, which leaves the sequential scan three products per chunk
instead of five.
"""
import torch
import triton
import triton.language as tl

from .launch_config import CHUNK, PackedChunkTable, scan_values, stages, tile_bytes, value_blocks, warps, wide_values
from .tiles import cast, chunk_decay, chunk_rows, load_rows, mm, sequence_chunks, state_tile


@triton.jit
def state_fwd_kernel(
    k, kx, d, beta, g_cum, w, u_tilde, h0, states, u, ht, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, IEEE: tl.constexpr,
):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, c0, n_chunks = sequence_chunks(cu_seqlens, chunk_offsets, i_n)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    kv, m_kv = state_tile(i_v, K, V, BK, BV)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + (i_n * H + i_h).to(tl.int64) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    for i in range(n_chunks):
        t0 = bos + i * C
        tok = t0 + o_c
        m_c = tok < eos
        row = tok * H + i_h
        tl.store(states + ((c0 + i) * H + i_h) * K * V + kv, cast(b_h, states.dtype.element_ty), mask=m_kv)

        b_w = load_rows(w, row * K, m_c, o_k, K)
        b_u = load_rows(u_tilde, row * V, m_c, o_v, V) - mm(b_w, b_h, IEEE)
        tl.store(u + row[:, None] * V + o_v[None, :], cast(b_u, u.dtype.element_ty),
                 mask=m_c[:, None] & m_v[None, :])

        b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
        g_last = tl.load(g_cum + (tl.minimum(t0 + C, eos) - 1) * H + i_h)
        b_dec = tl.where(m_c, tl.exp(g_last - b_G), 0.0)
        b_k = load_rows(k, row * K, m_c, o_k, K)
        b_h = b_h * tl.exp(g_last) + mm(tl.trans(b_k), b_u * b_dec[:, None], IEEE)
        for l in tl.static_range(1, L):
            b_kx = load_rows(kx, (row * (L - 1) + l - 1) * K, m_c, o_k, K)
            b_bl = tl.load(beta + row * L + l, mask=m_c, other=0.0).to(tl.float32)
            b_wl = load_rows(d, (row * L + l) * V, m_c, o_v, V) * (b_bl * b_dec)[:, None]
            b_h += mm(tl.trans(b_kx), b_wl, IEEE)
    if STORE_FINAL:
        tl.store(ht + (i_n * H + i_h).to(tl.int64) * K * V + kv, b_h, mask=m_kv)


def _scan_outputs(x: torch.Tensor, V: int, per_sequence: bool, table: PackedChunkTable):
    """What a state scan over x's [tokens, heads, K] rows writes: a K x V tile per chunk and a row of V per
    token (x's dtype), and a float32 K x V state per sequence where asked for (None otherwise)."""
    TT, H, K = x.shape
    per_chunk = torch.empty(table.num_chunks, H, K, V, dtype=x.dtype, device=x.device)
    per_token = torch.empty(TT, H, V, dtype=x.dtype, device=x.device)
    per_seq = torch.empty(table.num_seqs, H, K, V, dtype=torch.float32, device=x.device) if per_sequence else None
    return per_chunk, per_token, per_seq


def _scan_launch(x: torch.Tensor, V: int, table: PackedChunkTable):
    """A state scan's block sizes (for its warps), its value blocks, and its grid: one program per
    (sequence, head, block of value columns)."""
    blocks = value_blocks(x, V)
    scan = scan_values(blocks, table.num_seqs, x.shape[1], x.device)
    return blocks, scan, (table.num_seqs, x.shape[1], triton.cdiv(V, scan["BV"]))


def state_fwd(*, k: torch.Tensor, kx: torch.Tensor | None, d: torch.Tensor, beta: torch.Tensor,
              g_cum: torch.Tensor, w: torch.Tensor, u_tilde: torch.Tensor, initial_state: torch.Tensor | None,
              output_final_state: bool, table: PackedChunkTable):
    """The state at each chunk's start and U (the input dtype), and the final states (float32) or None."""
    L, V = d.shape[-2], d.shape[-1]
    states, u, final = _scan_outputs(k, V, output_final_state, table)
    blocks, scan, grid = _scan_launch(k, V, table)
    # Per chunk: k, w and the extra keys; U~ and the L - 1 extra directions.
    state_fwd_kernel[grid](
        k=k, kx=k if kx is None else kx, d=d, beta=beta, g_cum=g_cum, w=w, u_tilde=u_tilde, h0=initial_state,
        states=states, u=u, ht=final, cu_seqlens=table.cu_seqlens, chunk_offsets=table.chunk_offsets,
        H=k.shape[1], L=L, C=CHUNK, HAS_H0=initial_state is not None, STORE_FINAL=output_final_state,
        num_warps=warps("state_fwd", blocks), num_stages=stages(tile_bytes(scan, key=L + 1, value=L)), **scan)
    return states, u, final


@triton.jit
def du_local_kernel(
    q, k, g_cum, do, du_local, chunks, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    """dU_local per chunk, head and block of value columns, in float32: rounded to 16 bits here and again
    as part of dU, it put dg measurably further off the float64 loop on the hardest test inputs
    (docs/PERFORMANCE.md)."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, tok, m_c, row = chunk_rows(chunks, i_c, i_h, H, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
    b_pt = chunk_decay(b_G, m_c, False, False, C) * mm(
        load_rows(k, row * K, m_c, o_k, K), tl.trans(load_rows(q, row * K, m_c, o_k, K)), IEEE)
    b_du = scale * mm(b_pt, load_rows(do, row * V, m_c, o_v, V), IEEE)
    tl.store(du_local + row[:, None] * V + o_v[None, :], cast(b_du, du_local.dtype.element_ty),
             mask=m_c[:, None] & (o_v < V)[None, :])


def du_local(*, q: torch.Tensor, k: torch.Tensor, g_cum: torch.Tensor, do: torch.Tensor, scale: float,
             table: PackedChunkTable) -> torch.Tensor:
    """dU_local (float32), per token and head."""
    TT, H, _ = q.shape
    V = do.shape[-1]
    out = torch.empty(TT, H, V, dtype=torch.float32, device=q.device)
    blocks = value_blocks(q, V)
    wide = wide_values(blocks)
    du_local_kernel[(table.num_chunks, H, triton.cdiv(V, wide["BV"]))](
        q=q, k=k, g_cum=g_cum, do=do, du_local=out, chunks=table.chunks, scale=scale, H=H, C=CHUNK,
        num_warps=warps("du_local", blocks), **wide)
    return out


@triton.jit
def state_bwd_kernel(
    q, k, w, g_cum, do, du_local, dht, dh0, d_states, du, cu_seqlens, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr, IEEE: tl.constexpr,
):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, c0, n_chunks = sequence_chunks(cu_seqlens, chunk_offsets, i_n)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    kv, m_kv = state_tile(i_v, K, V, BK, BV)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + (i_n * H + i_h).to(tl.int64) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    for j in range(n_chunks):
        i = n_chunks - 1 - j
        t0 = bos + i * C
        tok = t0 + o_c
        m_c = tok < eos
        row = tok * H + i_h
        tl.store(d_states + ((c0 + i) * H + i_h) * K * V + kv, cast(b_dh, d_states.dtype.element_ty), mask=m_kv)

        b_G = tl.load(g_cum + row, mask=m_c, other=0.0)
        g_last = tl.load(g_cum + (tl.minimum(t0 + C, eos) - 1) * H + i_h)
        b_dec = tl.where(m_c, tl.exp(g_last - b_G), 0.0)
        b_gam = tl.where(m_c, tl.exp(b_G), 0.0)
        b_q = load_rows(q, row * K, m_c, o_k, K)
        b_k = load_rows(k, row * K, m_c, o_k, K)
        b_do = load_rows(do, row * V, m_c, o_v, V)
        b_du = load_rows(du_local, row * V, m_c, o_v, V).to(tl.float32) + b_dec[:, None] * mm(b_k, b_dh, IEEE)
        tl.store(du + row[:, None] * V + o_v[None, :], cast(b_du, du.dtype.element_ty),
                 mask=m_c[:, None] & m_v[None, :])
        b_w = load_rows(w, row * K, m_c, o_k, K)
        b_dh = (b_dh * tl.exp(g_last) + mm(tl.trans(b_q * (scale * b_gam)[:, None]), b_do, IEEE)
                - mm(tl.trans(b_w), b_du, IEEE))
    if HAS_H0:
        tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * K * V + kv, b_dh, mask=m_kv)


def state_bwd(*, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, g_cum: torch.Tensor, do: torch.Tensor,
              du_local: torch.Tensor, dht: torch.Tensor | None, with_initial_state: bool, scale: float,
              table: PackedChunkTable):
    """dS at each chunk's end and dU (the input dtype), and the initial states' gradient (float32) or None."""
    V = do.shape[-1]
    d_states, du, dh0 = _scan_outputs(q, V, with_initial_state, table)
    blocks, scan, grid = _scan_launch(q, V, table)
    state_bwd_kernel[grid](
        q=q, k=k, w=w, g_cum=g_cum, do=do, du_local=du_local, dht=dht, dh0=dh0, d_states=d_states, du=du,
        cu_seqlens=table.cu_seqlens, chunk_offsets=table.chunk_offsets, scale=scale, H=q.shape[1], C=CHUNK,
        HAS_DHT=dht is not None, HAS_H0=with_initial_state,
        num_warps=warps("state_bwd", blocks), num_stages=stages(tile_bytes(scan, key=3, value=3)), **scan)
    return d_states, du, dh0
