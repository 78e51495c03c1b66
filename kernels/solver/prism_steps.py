"""The prism solver's elementwise pass (docs/SOLVERS.md section 1; reference: naive.py's prism_outputs),
forward and backward each one Triton kernel over tokens and heads. Per token and head, from the
projection of the anchor (gains before their bias, extra keys, strength logits) and v, u:

    r^1 = v - u (or v);  d^l = GELU((p_gain^l + bias_gain^l) * r^l),  r^l+1 = r^l - d^l   (l = 1..L)
    kx^l = l2norm(p_key^l) (or p_key^l),  beta^s = sigmoid(p_strength^s + bias_strength^s)   (s = 1..S)

S is L, or L-1 where the mixer makes b^1 from x (solver_erase_strength: input).

Sums in float32 (float64 for float64 inputs). The backward keeps nothing from the forward but its
inputs: it forms r^l again on the way down the chain (L^2/2 elementwise steps; the gains it reads
again are in the cache). The biases' gradients are the projection's gradient summed over tokens, as
autograd forms them for the PyTorch code; torch sums them after the kernel (deterministic, and no
per-block partial sums, which at the small token blocks that keep the registers few would be as
large as the sums' input).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Few tokens a block: each thread then holds 8 elements of a [BLOCK_TOKENS, 128] tile, and neither
# kernel spills (the backward holds about ten such tiles and their pointers).
BLOCK_TOKENS = 4
NUM_WARPS = 2
KEY_NORM_EPS = tl.constexpr(1e-6)  # l2norm's (kernels/fused/l2norm.py)


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))


@triton.jit
def _gelu_grad(a):
    return 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)


@triton.jit
def _gain(proj_rows, gain_bias, i_h, o_v, m, m_v, l: tl.constexpr, L: tl.constexpr, V: tl.constexpr,
          ACC: tl.constexpr):
    """p_gain^l + bias_gain^l for the block's tokens [BT, BV]."""
    b_p = tl.load(proj_rows + l * V + o_v[None, :], mask=m, other=0.0).to(ACC)
    return b_p + tl.load(gain_bias + (i_h * L + l) * V + o_v, mask=m_v, other=0.0).to(ACC)[None, :]


@triton.jit
def _block(proj, v, u, N, stride_pn, stride_ph, stride_vn, stride_vh, stride_un, stride_uh, V: tl.constexpr,
           SUBTRACT_ANCHOR: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr):
    """This program's tokens t, head, value columns and their masks, its rows of the projection, and
    r^1 = v - u, or v without SUBTRACT_ANCHOR [BT, BV]."""
    i_h = tl.program_id(1)
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    m_t = t < N
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    m = m_t[:, None] & m_v[None, :]
    r1 = tl.load(v + t[:, None] * stride_vn + i_h * stride_vh + o_v[None, :], mask=m, other=0.0).to(ACC)
    if SUBTRACT_ANCHOR:
        r1 -= tl.load(u + t[:, None] * stride_un + i_h * stride_uh + o_v[None, :], mask=m, other=0.0).to(ACC)
    return t, i_h, m_t, o_v, m_v, m, proj + t * stride_pn + i_h * stride_ph, r1


@triton.jit
def _prism_steps_fwd(proj, gain_bias, strength_bias, v, u, d, kx, beta, N, H,
                     stride_pn, stride_ph, stride_vn, stride_vh, stride_un, stride_uh,
                     L: tl.constexpr, S: tl.constexpr, V: tl.constexpr, K: tl.constexpr, KEY_NORM: tl.constexpr,
                     SUBTRACT_ANCHOR: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                     ACC: tl.constexpr):
    t, i_h, m_t, o_v, m_v, m, proj_row, r = _block(proj, v, u, N, stride_pn, stride_ph, stride_vn, stride_vh,
                                                   stride_un, stride_uh, V, SUBTRACT_ANCHOR, BT, BV, ACC)
    proj_rows = proj_row[:, None]
    row = t * H + i_h  # [token, head] of the outputs
    for l in tl.static_range(L):
        b_d = _gelu(_gain(proj_rows, gain_bias, i_h, o_v, m, m_v, l, L, V, ACC) * r)
        tl.store(d + (row * L + l)[:, None] * V + o_v[None, :], b_d.to(d.dtype.element_ty), mask=m)
        r -= b_d
    o_k = tl.arange(0, BK)
    m_k = m_t[:, None] & (o_k < K)[None, :]
    for l in tl.static_range(L - 1):
        b_k = tl.load(proj_rows + L * V + l * K + o_k[None, :], mask=m_k, other=0.0).to(ACC)
        if KEY_NORM:
            b_k = b_k * tl.math.rsqrt(tl.sum(b_k * b_k, 1) + KEY_NORM_EPS)[:, None]
        tl.store(kx + (row * (L - 1) + l)[:, None] * K + o_k[None, :], b_k.to(kx.dtype.element_ty), mask=m_k)
    for s in tl.static_range(S):
        z = tl.load(proj_row + L * V + (L - 1) * K + s, mask=m_t, other=0.0).to(ACC)
        z += tl.load(strength_bias + i_h * S + s).to(ACC)
        tl.store(beta + row * S + s, tl.sigmoid(z).to(beta.dtype.element_ty), mask=m_t)


@triton.jit
def _prism_steps_bwd(proj, gain_bias, strength_bias, v, u, dd, dkx, dbeta, dproj, dv, du, N, H, P,
                     stride_pn, stride_ph, stride_vn, stride_vh, stride_un, stride_uh,
                     L: tl.constexpr, S: tl.constexpr, V: tl.constexpr, K: tl.constexpr, KEY_NORM: tl.constexpr,
                     SUBTRACT_ANCHOR: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                     BPAD: tl.constexpr, ACC: tl.constexpr):
    t, i_h, m_t, o_v, m_v, m, proj_row, r1 = _block(proj, v, u, N, stride_pn, stride_ph, stride_vn, stride_vh,
                                                    stride_un, stride_uh, V, SUBTRACT_ANCHOR, BT, BV, ACC)
    proj_rows = proj_row[:, None]
    row = t * H + i_h
    dproj_row = dproj + row * P  # dproj is contiguous
    dproj_rows = dproj_row[:, None]
    # Down the chain: dr is the gradient reaching r^l+1; d^l receives dd^l and, through
    # r^l+1 = r^l - d^l, minus dr.
    dr = tl.zeros([BT, BV], dtype=ACC)
    for l in tl.static_range(L - 1, -1, -1):
        r = r1
        for j in tl.static_range(l):
            r -= _gelu(_gain(proj_rows, gain_bias, i_h, o_v, m, m_v, j, L, V, ACC) * r)
        gain = _gain(proj_rows, gain_bias, i_h, o_v, m, m_v, l, L, V, ACC)
        a = gain * r
        b_dd = tl.load(dd + (row * L + l)[:, None] * V + o_v[None, :], mask=m, other=0.0).to(ACC)
        da = (b_dd - dr) * _gelu_grad(a)
        dgain = da * r
        tl.store(dproj_rows + l * V + o_v[None, :], dgain.to(dproj.dtype.element_ty), mask=m)
        dr += da * gain
    tl.store(dv + row[:, None] * V + o_v[None, :], dr.to(dv.dtype.element_ty), mask=m)
    if SUBTRACT_ANCHOR:
        tl.store(du + row[:, None] * V + o_v[None, :], (-dr).to(du.dtype.element_ty), mask=m)
    o_k = tl.arange(0, BK)
    m_k = m_t[:, None] & (o_k < K)[None, :]
    for l in tl.static_range(L - 1):
        b_dk = tl.load(dkx + (row * (L - 1) + l)[:, None] * K + o_k[None, :], mask=m_k, other=0.0).to(ACC)
        if KEY_NORM:
            b_k = tl.load(proj_rows + L * V + l * K + o_k[None, :], mask=m_k, other=0.0).to(ACC)
            rs = tl.math.rsqrt(tl.sum(b_k * b_k, 1) + KEY_NORM_EPS)
            b_dk = rs[:, None] * b_dk - b_k * (rs * rs * rs * tl.sum(b_dk * b_k, 1))[:, None]
        tl.store(dproj_rows + L * V + l * K + o_k[None, :], b_dk.to(dproj.dtype.element_ty), mask=m_k)
    for s in tl.static_range(S):
        z = tl.load(proj_row + L * V + (L - 1) * K + s, mask=m_t, other=0.0).to(ACC)
        b_s = tl.sigmoid(z + tl.load(strength_bias + i_h * S + s).to(ACC))
        dz = tl.load(dbeta + row * S + s, mask=m_t, other=0.0).to(ACC) * b_s * (1.0 - b_s)
        tl.store(dproj_row + L * V + (L - 1) * K + s, dz.to(dproj.dtype.element_ty), mask=m_t)
    # The projection's alignment columns past the strengths get no gradient.
    used = L * V + (L - 1) * K + S
    o_pad = used + tl.arange(0, BPAD)
    m_pad = m_t[:, None] & (o_pad < P)[None, :]
    tl.store(dproj_rows + o_pad[None, :], tl.zeros([BT, BPAD], dtype=ACC).to(dproj.dtype.element_ty), mask=m_pad)


def _meta(projection: torch.Tensor, L: int, S: int, V: int, K: int, key_norm: bool, subtract_anchor: bool) -> dict:
    acc = tl.float64 if projection.dtype == torch.float64 else tl.float32
    return dict(L=L, S=S, V=V, K=K, KEY_NORM=key_norm, SUBTRACT_ANCHOR=subtract_anchor, BT=BLOCK_TOKENS,
                BV=triton.next_power_of_2(V), BK=triton.next_power_of_2(K), ACC=acc, num_warps=NUM_WARPS)


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for x in tensors for s in x.stride()[:2]]


class PrismStepsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projection, gain_bias, strength_bias, v, u, key_dim, key_norm):
        N, H, P = projection.shape
        _, L, V = gain_bias.shape
        S = strength_bias.shape[1]
        subtract_anchor = u is not None
        anchor = u if subtract_anchor else v  # r^1 = v reads no anchor: v stands in for its pointer
        if (P < L * V + (L - 1) * key_dim + S or projection.stride(2) != 1 or v.stride(2) != 1
                or anchor.stride(2) != 1):
            raise ValueError(f"projection {tuple(projection.shape)} too narrow for L={L}, S={S}, V={V}, K={key_dim}, "
                             "or an input's last dimension is not contiguous")
        d = v.new_empty(N, H, L, V)
        kx = projection.new_empty(N, H, L - 1, key_dim)
        beta = projection.new_empty(N, H, S)
        grid = (triton.cdiv(N, BLOCK_TOKENS), H)
        _prism_steps_fwd[grid](projection, gain_bias, strength_bias, v, anchor, d, kx, beta, N, H,
                               *_strides(projection, v, anchor),
                               **_meta(projection, L, S, V, key_dim, key_norm, subtract_anchor))
        ctx.save_for_backward(projection, gain_bias, strength_bias, v, u)
        ctx.key_dim, ctx.key_norm = key_dim, key_norm
        return d, kx, beta

    @staticmethod
    def backward(ctx, dd, dkx, dbeta):
        projection, gain_bias, strength_bias, v, u = ctx.saved_tensors
        N, H, P = projection.shape
        _, L, V = gain_bias.shape
        S = strength_bias.shape[1]
        K = ctx.key_dim
        subtract_anchor = u is not None
        anchor = u if subtract_anchor else v
        acc_dtype = torch.promote_types(projection.dtype, torch.float32)
        grid = (triton.cdiv(N, BLOCK_TOKENS), H)
        dproj = torch.empty_like(projection, memory_format=torch.contiguous_format)
        dv, du = v.new_empty(N, H, V), u.new_empty(N, H, V) if subtract_anchor else None
        strengths = L * V + (L - 1) * K
        _prism_steps_bwd[grid](projection, gain_bias, strength_bias, v, anchor, dd.contiguous(), dkx.contiguous(),
                               dbeta.contiguous(), dproj, dv, du, N, H, P, *_strides(projection, v, anchor),
                               BPAD=max(triton.next_power_of_2(P - strengths - S), 1),
                               **_meta(projection, L, S, V, K, ctx.key_norm, subtract_anchor))
        dgain_bias = dproj[..., : L * V].sum(0, dtype=acc_dtype).unflatten(-1, (L, V))
        dstrength_bias = dproj[..., strengths: strengths + S].sum(0, dtype=acc_dtype)
        return dproj, dgain_bias.to(gain_bias.dtype), dstrength_bias.to(strength_bias.dtype), dv, du, None, None


def prism_steps(projection: torch.Tensor, gain_bias: torch.Tensor, strength_bias: torch.Tensor, v: torch.Tensor,
                u: torch.Tensor | None, key_dim: int, key_norm: bool):
    """projection [N, H, P >= L*V + (L-1)*K + S] (gains before their bias, extra keys, strength logits;
    columns past them are ignored), gain_bias [H, L, V], strength_bias [H, S], v [N, H, V], u [N, H, V]
    (r^1 = v - u) or None (r^1 = v); rows may be strided -> d [N, H, L, V], kx [N, H, L-1, K] (None at
    L = 1), beta [N, H, S]."""
    d, kx, beta = PrismStepsFunction.apply(projection, gain_bias.contiguous(), strength_bias.contiguous(), v, u,
                                           key_dim, key_norm)
    return d, (kx if gain_bias.shape[1] > 1 else None), beta
