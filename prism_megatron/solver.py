"""The PRISM solver (PRISM.md section 2, Eq. 9-16): update directions, extra write keys and write
strengths from the anchor u and the value v, per head and token.

    r^1 = v - u;  for l = 1..L:  d^l = GELU((W_p^l u + bias_p^l) * r^l),  r^l+1 = r^l - d^l
    kappa^l = l2norm(W_k^l u) (l >= 2),  b^l = sigmoid(w_b^l . u + c^l)

Token-local, so under TP each rank holds the weights of its own heads and never communicates.
All L gains, keys and strengths come from one batched einsum each; only the residual chain
r -> d is sequential in l.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from torch import nn

from prism_megatron.layers import fused_on_cuda, upcast
from prism_megatron.sharding import constant_init, normal_init, sharded_parameter


@fused_on_cuda
def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dimension (fla's l2norm)."""
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


@fused_on_cuda
def directions(gain: torch.Tensor, gain_bias: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The residual chain: gain [B, T, H, L, V] (before its bias), v, u [B, T, H, V] -> d [B, T, H, L, V]."""
    gain = gain + gain_bias
    residual = v - u
    steps = []
    for step in range(gain.shape[3]):
        d = F.gelu(gain[:, :, :, step] * residual)
        steps.append(d)
        residual = residual - d
    return torch.stack(steps, dim=3)


@fused_on_cuda
def strengths(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits + bias)


class PrismSolver(nn.Module):
    def __init__(self, local_heads: int, head_k_dim: int, head_v_dim: int, steps: int, *,
                 config: ModelParallelConfig, init_std: float):
        super().__init__()
        H, K, V, L = local_heads, head_k_dim, head_v_dim, steps

        def head_param(shape, init):
            return sharded_parameter((H,) + shape, init, config)

        # W_p starts small and its bias at 1, so that d^1 starts near GELU(v - u).
        self.gain_weight = head_param((L, V, V), normal_init(init_std))
        self.gain_bias = head_param((L, V), constant_init(1.0))
        self.key_weight = head_param((L - 1, K, V), normal_init(V**-0.5)) if L > 1 else None
        self.strength_weight = head_param((L, V), normal_init(init_std))
        self.strength_bias = head_param((L,), constant_init(0.0))
        self.steps = L

    def forward(self, u: torch.Tensor, v: torch.Tensor):
        """u, v: [B, T, H, V] -> d [B, T, H, L, V], kx [B, T, H, L-1, K] or None, beta [B, T, H, L]."""
        gain = torch.einsum("bthv,hlwv->bthlw", u, self.gain_weight)
        d = directions(gain, self.gain_bias, v, u)
        beta = strengths(torch.einsum("bthv,hlv->bthl", u, self.strength_weight), self.strength_bias)
        kx = None
        if self.key_weight is not None:
            kx = l2norm(torch.einsum("bthv,hlkv->bthlk", u, self.key_weight))
        return d, kx, beta
