"""The causal depthwise short convolution of the mixer, with document resets and an optional SiLU on
its leading channels, forward and backward each one Triton kernel over all channels.

    y_t = act(sum_s w[:, W-1-s] * x_{t-s} [position_t >= s])      act = SiLU on channels < silu_channels

x [N, C] (rows may be strided: the mixer passes its slice of the in_proj output without a copy),
w [C, W], position [N] each token's index within its sequence, read in the kernel, so a window never
reaches into the previous document or row. Sums in float32 (float64 for float64 inputs); y in x's
dtype. The backward recomputes the pre-activations instead of saving them (W reads per token that hit
the cache), forms their gradient in a float32 buffer, then the taps' gradients from it, and writes the
weight gradient as per-program partial sums that torch adds up (no atomics: deterministic). Reference:
naive.causal_depthwise_conv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles (tokens, channels) and warps of the forward and of the two backward kernels, the fastest of
# those timed on an H200 at the 1.3B layer's shape (docs/PERFORMANCE.md). None spills; at [64, 128]
# over 8 warps both backward kernels did, at 255 registers a thread.
FORWARD = dict(BT=32, BC=64, num_warps=4)
BACKWARD = dict(BT=16, BC=64, num_warps=2)
# The taps' kernel sums the weight gradient over this many token blocks before writing its partial
# sum, which keeps the partial sums' buffer (programs x C x W floats) an eighth of a bf16 input's bytes.
TAP_BLOCKS = 4


@triton.jit
def _window(x, w, pos, t, o_c, m_c, N, stride_x, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
            ACC: tl.constexpr):
    """Pre-activations [BT, BC] at tokens t (a vector; rows past N or before 0 give 0)."""
    p = tl.load(pos + t, mask=(t >= 0) & (t < N), other=-1)
    acc = tl.zeros([BT, BC], dtype=ACC)
    for s in tl.static_range(W):
        m = ((p >= s) & (t - s >= 0) & (t < N))[:, None] & m_c[None, :]
        b_x = tl.load(x + (t - s).to(tl.int64)[:, None] * stride_x + o_c[None, :], mask=m, other=0.0).to(ACC)
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(ACC)
        acc += b_x * b_w[None, :]
    return acc


@triton.jit
def _conv_fwd(x, w, pos, y, N, stride_x, C, silu_channels,
              W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = o_c < C
    acc = _window(x, w, pos, t, o_c, m_c, N, stride_x, W, BT, BC, ACC)
    act = acc / (1.0 + tl.exp(-acc))
    acc = tl.where((o_c < silu_channels)[None, :], act, acc)
    m = (t < N)[:, None] & m_c[None, :]
    tl.store(y + t.to(tl.int64)[:, None] * C + o_c[None, :], acc.to(y.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_pre(x, w, pos, dy, dpre, N, stride_x, C, silu_channels,
                  W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """dpre_t = dy_t * act'(pre_t): the gradient of the pre-activations, recomputed from x."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = o_c < C
    m = (t < N)[:, None] & m_c[None, :]
    b_dy = tl.load(dy + t.to(tl.int64)[:, None] * C + o_c[None, :], mask=m, other=0.0).to(ACC)
    if tl.program_id(1) * BC < silu_channels:  # blocks past the SiLU channels pass dy through
        pre = _window(x, w, pos, t, o_c, m_c, N, stride_x, W, BT, BC, ACC)
        sig = 1.0 / (1.0 + tl.exp(-pre))
        b_dy = tl.where((o_c < silu_channels)[None, :], b_dy * sig * (1.0 + pre * (1.0 - sig)), b_dy)
    tl.store(dpre + t.to(tl.int64)[:, None] * C + o_c[None, :], b_dy, mask=m)


@triton.jit
def _conv_bwd_taps(x, w, pos, dpre, dx, dw_part, N, stride_x, C, W: tl.constexpr, BW: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, BLOCKS: tl.constexpr, ACC: tl.constexpr):
    """dx_t = sum_s w[W-1-s] dpre_{t+s} [pos_{t+s} >= s];  dw[W-1-s] = sum_t dpre_t x_{t-s} [pos_t >= s]
    (this program's part of the sum over t: BLOCKS blocks of BT tokens)."""
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_s = tl.arange(0, BW)
    b_dw = tl.zeros([BW, BC], dtype=ACC)  # row s: tap W-1-s
    for i in range(BLOCKS):
        t = (tl.program_id(0) * BLOCKS + i) * BT + tl.arange(0, BT)
        m_t = t < N
        b_dx = tl.zeros([BT, BC], dtype=ACC)
        for s in tl.static_range(W):
            ts = t + s
            p = tl.load(pos + ts, mask=ts < N, other=-1)
            m = (p >= s)[:, None] & m_c[None, :]
            b_dpre = tl.load(dpre + ts.to(tl.int64)[:, None] * C + o_c[None, :], mask=m, other=0.0)
            b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(ACC)
            b_dx += b_dpre * b_w[None, :]
        tl.store(dx + t.to(tl.int64)[:, None] * C + o_c[None, :], b_dx.to(dx.dtype.element_ty),
                 mask=m_t[:, None] & m_c[None, :])
        b_dpre = tl.load(dpre + t.to(tl.int64)[:, None] * C + o_c[None, :], mask=m_t[:, None] & m_c[None, :],
                         other=0.0)
        p_t = tl.load(pos + t, mask=m_t, other=-1)
        for s in tl.static_range(W):
            m = ((p_t >= s) & (t - s >= 0) & m_t)[:, None] & m_c[None, :]
            b_x = tl.load(x + (t - s).to(tl.int64)[:, None] * stride_x + o_c[None, :], mask=m, other=0.0).to(ACC)
            b_dw += tl.where((o_s == s)[:, None], tl.sum(b_dpre * b_x, axis=0)[None, :], 0.0)
    m_dw = (o_s < W)[:, None] & m_c[None, :]
    tl.store(dw_part + (tl.program_id(0) * C + o_c[None, :]).to(tl.int64) * W + (W - 1 - o_s[:, None]), b_dw,
             mask=m_dw)


def _launch_args(x: torch.Tensor, config: dict):
    N, C = x.shape
    grid = (triton.cdiv(N, config["BT"]), triton.cdiv(C, config["BC"]))
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    return N, C, grid, dict(config, ACC=acc)


class CausalConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, position, silu_channels):
        N, C, grid, meta = _launch_args(x, FORWARD)
        y = x.new_empty(N, C)
        _conv_fwd[grid](x, weight, position, y, N, x.stride(0), C, silu_channels, W=weight.shape[1], **meta)
        ctx.save_for_backward(x, weight, position)
        ctx.silu_channels = silu_channels
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, position = ctx.saved_tensors
        N, C, grid, meta = _launch_args(x, BACKWARD)
        W = weight.shape[1]
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        # Two passes: the pre-activations' gradient, then the taps. One kernel doing both recomputed
        # W windows per token and held too many tiles at once (its registers spilled).
        dpre = torch.empty(N, C, dtype=acc_dtype, device=x.device)
        _conv_bwd_pre[grid](x, weight, position, dy.contiguous(), dpre, N, x.stride(0), C, ctx.silu_channels,
                            W=W, **meta)
        dx = torch.empty(N, C, dtype=x.dtype, device=x.device)
        taps_grid = (triton.cdiv(grid[0], TAP_BLOCKS), grid[1])
        dw_part = torch.empty(taps_grid[0], C, W, dtype=acc_dtype, device=x.device)
        _conv_bwd_taps[taps_grid](x, weight, position, dpre, dx, dw_part, N, x.stride(0), C, W=W,
                                  BW=triton.next_power_of_2(W), BLOCKS=TAP_BLOCKS, **meta)
        return dx, dw_part.sum(0).to(weight.dtype), None, None


def causal_conv(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor, silu_channels: int = 0) -> torch.Tensor:
    """x [..., C] (last dimension contiguous), weight [C, W], position [...] -> y [..., C]; SiLU on the
    first silu_channels channels."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    flat = x.reshape(-1, x.shape[-1])  # a view of the mixer's strided slice: its rows stay strided
    y = CausalConvFunction.apply(flat, weight.contiguous(), position.reshape(-1).to(torch.int32).contiguous(),
                                 silu_channels)
    return y.view(x.shape)
