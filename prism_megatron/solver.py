"""The PRISM solver (PRISM.md section 2, Eq. 9-16): update directions, extra write keys and write
strengths from the anchor u and the value v, per head and token.

    r^1 = v - u;  for l = 1..L:  d^l = GELU((W_p^l u + bias_p^l) * r^l),  r^l+1 = r^l - d^l
    kappa^l = l2norm(W_k^l u) (l >= 2),  b^l = sigmoid(w_b^l . u + c^l)

Token-local, so under TP each rank holds the weights of its own heads and never communicates.
All L gains, keys and strengths of a head come from one GEMM of the anchor (a batched matmul over
heads); only the residual chain r -> d is sequential in l. The solver keeps only u and v for the
backward and recomputes the rest there (one more GEMM and elementwise pass): its intermediates are
as large as d and kx together, while u and v are views of the convolution's output, which the layer
keeps anyway.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from torch import nn

from torch.utils.checkpoint import checkpoint

from prism_megatron.layers import Fusable, upcast
from prism_megatron.sharding import constant_init, normal_init, sharded_parameter


@Fusable
def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dimension (fla's l2norm)."""
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


@Fusable
def solver_outputs(projection: torch.Tensor, gain_bias: torch.Tensor, strength_bias: torch.Tensor,
                   v: torch.Tensor, u: torch.Tensor, key_dim: int):
    """The elementwise part of the solver. projection [H, N, L*V + (L-1)*K + L]: per head the gains
    (before their bias), the extra keys (before their norm) and the strength logits of the N tokens;
    v, u [N, H, V] -> d [N, H, L, V], kx [N, H, L-1, K] or None, beta [N, H, L]."""
    H, L, V = gain_bias.shape
    per_token = projection.transpose(0, 1)
    gain = per_token[..., : L * V].unflatten(-1, (L, V)) + gain_bias
    residual = v - u
    steps = []
    for step in range(L):
        d = F.gelu(gain[:, :, step] * residual)
        steps.append(d)
        residual = residual - d
    kx = None
    if L > 1:
        kx = l2norm.eager(per_token[..., L * V: L * V + (L - 1) * key_dim].unflatten(-1, (L - 1, key_dim)))
    beta = torch.sigmoid(per_token[..., L * V + (L - 1) * key_dim:] + strength_bias)
    return torch.stack(steps, dim=2), kx, beta


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

    def forward(self, u: torch.Tensor, v: torch.Tensor, fused: bool):
        """u, v: [B, T, H, V] -> d [B, T, H, L, V], kx [B, T, H, L-1, K] or None, beta [B, T, H, L]."""
        d, kx, beta = checkpoint(self._solve, u.flatten(0, 1), v.flatten(0, 1), fused, use_reentrant=False)
        tokens = u.shape[:2]
        return d.unflatten(0, tokens), None if kx is None else kx.unflatten(0, tokens), beta.unflatten(0, tokens)

    def _solve(self, u: torch.Tensor, v: torch.Tensor, fused: bool):
        H, L, V = self.gain_bias.shape
        parts = [self.gain_weight.reshape(H, L * V, V), self.strength_weight]
        if self.key_weight is not None:
            parts.insert(1, self.key_weight.flatten(1, 2))
        weight = torch.cat(parts, 1)  # [H, L*V + (L-1)*K + L, V]
        projection = torch.bmm(u.transpose(0, 1), weight.transpose(1, 2))
        key_dim = 0 if self.key_weight is None else self.key_weight.shape[2]
        return solver_outputs(fused, projection, self.gain_bias, self.strength_bias, v, u, key_dim)
