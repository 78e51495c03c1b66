"""The PRISM recurrence token by token in one Triton kernel, for decoding (inference only: no autograd).

Each program holds one (row, head, block of value columns) tile of the state in registers across the
call's tokens, the state's value columns evolving independently, and per token applies Eq. 18 as

    S <- a S;   u = b1 (d^1 - S^T k);   S <- S + k u^T + sum_{l>=2} b^l kappa^l (d^l)^T;   o = scale S^T q

(the erase and the first write folded into one rank-1 update with the pseudo-value u, as in
PRISM.md section 4). Products are elementwise and summed in the state's dtype, so 16-bit inputs only
round o on its way out. The state is read and written in place: a decode step costs one read and one
write of it, and no allocation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import state_dtype
from .tiles import cast, state_tile

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Value columns per program: narrow tiles give a decode step of a few rows and heads enough programs to
# fill the GPU, and keep a K = 256 state tile in one warp's registers (fla's fused recurrent kernels' choice).
BV = 8


@triton.jit
def fused_recurrent_fwd_kernel(
    q, k, d, kx, beta, g, state, o, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    acc = state.dtype.element_ty
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    kv, m_kv = state_tile(i_v, K, V, BK, BV)
    p_state = state + (i_b * H + i_h).to(tl.int64) * K * V + kv

    b_h = tl.load(p_state, mask=m_kv, other=0.0)
    for t in range(T):
        row = (i_b.to(tl.int64) * T + t) * H + i_h
        b_q = tl.load(q + row * K + o_k, mask=m_k, other=0.0).to(acc)
        b_k = tl.load(k + row * K + o_k, mask=m_k, other=0.0).to(acc)
        b_d = tl.load(d + row * L * V + o_v, mask=m_v, other=0.0).to(acc)
        b_b1 = tl.load(beta + row * L).to(acc)

        b_h *= tl.exp(tl.load(g + row).to(acc))
        b_u = b_b1 * (b_d - tl.sum(b_k[:, None] * b_h, axis=0))
        b_h += b_k[:, None] * b_u[None, :]
        for l in tl.static_range(1, L):
            b_kx = tl.load(kx + (row * (L - 1) + l - 1) * K + o_k, mask=m_k, other=0.0).to(acc)
            b_dl = tl.load(d + (row * L + l) * V + o_v, mask=m_v, other=0.0).to(acc)
            b_h += b_kx[:, None] * (tl.load(beta + row * L + l).to(acc) * b_dl)[None, :]
        b_o = scale * tl.sum(b_q[:, None] * b_h, axis=0)
        tl.store(o + row * V + o_v, cast(b_o, o.dtype.element_ty), mask=m_v)
    tl.store(p_state, b_h, mask=m_kv)


def _check_step(inputs: dict[str, torch.Tensor | None], state: torch.Tensor) -> None:
    """What this kernel needs beyond the op's contract (PRISM.md section 1, checked by the op's entry point)."""
    dtype = inputs["q"].dtype
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"fused_recurrent_prism takes {INPUT_DTYPES} inputs, got {dtype}")
    if state.dtype != state_dtype(dtype):
        raise TypeError(f"fused_recurrent_prism: state must be {state_dtype(dtype)} for {dtype} inputs, got {state.dtype}")
    if not state.is_contiguous():
        raise ValueError("fused_recurrent_prism: state must be contiguous (it is updated in place)")
    if torch.is_grad_enabled():
        needing = [n for n, x in {**inputs, "state": state}.items() if x is not None and x.requires_grad]
        if needing:
            raise RuntimeError(f"fused_recurrent_prism is inference-only (no autograd), but got inputs that require "
                               f"grad ({', '.join(needing)}): call it under torch.no_grad()")


def fused_recurrent_prism(
    q: torch.Tensor,
    k: torch.Tensor,
    d: torch.Tensor,
    kx: torch.Tensor | None,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None,
    state: torch.Tensor,
) -> torch.Tensor:
    """o [B, T, H, V] of the PRISM recurrence over T >= 1 tokens per row from `state` [B, H, K, V] (float32;
    float64 for float64 inputs), which is updated in place to the state after each row's last token.
    Inputs as in the op's contract (PRISM.md section 1); scale None means K^-0.5. One launch. (On the GPU
    Triton passes scale as a float32 number, which float64 inputs then see rounded.)"""
    inputs = dict(q=q, k=k, d=d, kx=kx, beta=beta, g=g)
    _check_step(inputs, state)
    B, T, H, K = q.shape
    L, V = d.shape[3], d.shape[4]
    q, k, d, beta, g = (x.contiguous() for x in (q, k, d, beta, g))
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    fused_recurrent_fwd_kernel[(B, H, triton.cdiv(V, BV))](
        q=q, k=k, d=d, kx=k if kx is None else kx.contiguous(), beta=beta, g=g, state=state, o=o,
        scale=K**-0.5 if scale is None else scale, T=T, H=H, K=K, V=V, L=L,
        BK=triton.next_power_of_2(K), BV=BV, num_warps=1)
    return o
