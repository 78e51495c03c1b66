"""The inter-chunk state scan and its backward (PRISM.md section 4), one program per
(sequence, head, block of value columns); the state's value columns evolve independently.

Forward, chunk by chunk: store S_0, then U = U~ - W^ S_0 and
S_C = gamma_C S_0 + K^T diag(gamma_C/gamma) U + sum_l (Kappa^l)^T diag(gamma_C/gamma) b^l D^l.
(The extra keys' term does not depend on the state, but forming it in a parallel kernel and reading
it back as a float32 [K, V] tile per chunk measured slower on the H200 than these L - 1 products,
whose loads the pipeliner issues ahead: docs/PERFORMANCE.md.)

Backward, last chunk first, with dS = dL/dS_C: store dS, then the total pseudo-value gradient
dU = dU_local + diag(gamma_C/gamma) K dS, and dS_0 = gamma_C dS + scale (diag(gamma) Q)^T dO - W^T dU.
The output's part dU_local = scale (M^T * K Q^T) dO does not depend on the state: du_local_kernel forms
it for every chunk in parallel, as fla does, which leaves the sequential scan three products per chunk
instead of five.
"""
import triton
import triton.language as tl

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


@triton.jit
def du_local_kernel(
    q, k, g_cum, do, du_local, chunks, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):
    """dU_local per chunk, head and block of value columns, in float32: rounded to 16 bits here and again
    as part of dU, it put dg 10% further off the float64 loop on the hardest test inputs."""
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
