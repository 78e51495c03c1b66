"""Token-by-token PRISM recurrence: the specification every other backend is tested against.

    S_t = a_t (I - b1_t k_t k_t^T) S_{t-1} + sum_l b^l_t kappa^l_t (d^l_t)^T,   a_t = exp(g_t)
    o_t = scale * S_t^T q_t

with kappa^1 = k and kappa^2..L = kx. Differentiable by autograd in any dtype; the state is
carried in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_spans(batch: int, length: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every independent sequence, in the order of their states.

    cu_seqlens is trusted here: op.py's prism_recurrence checks the contract."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(bounds, bounds[1:])]


def naive_prism_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    d: torch.Tensor,
    kx: torch.Tensor | None,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    L = d.shape[3]
    out_dtype = q.dtype
    acc = state_dtype(out_dtype)
    scale = K**-0.5 if scale is None else scale
    q, k, d, beta, g = (x.to(acc) for x in (q, k, d, beta, g))
    kx = kx.to(acc) if kx is not None else None
    spans = sequence_spans(B, T, cu_seqlens)

    rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is not None:
            S = initial_state[n].to(acc)
        else:
            S = q.new_zeros(H, K, d.shape[-1])
        for t in range(start, end):
            kt = k[b, t]  # [H, K]
            b1 = beta[b, t, :, 0, None, None]
            erase = kt[:, :, None] * torch.einsum("hk,hkv->hv", kt, S)[:, None, :]
            S = torch.exp(g[b, t])[:, None, None] * (S - b1 * erase)
            S = S + b1 * kt[:, :, None] * d[b, t, :, 0, None, :]
            for l in range(1, L):
                S = S + beta[b, t, :, l, None, None] * kx[b, t, :, l - 1, :, None] * d[b, t, :, l, None, :]
            rows[b].append(scale * torch.einsum("hk,hkv->hv", q[b, t], S))
        finals.append(S)
    o = torch.stack([torch.stack(r) for r in rows]) if T > 0 else q.new_zeros(B, 0, H, d.shape[-1])
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(out_dtype), final_state
