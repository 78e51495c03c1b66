"""The solvers' elementwise parts in PyTorch (docs/SOLVERS.md sections 1 and 2): the reference of
prism_steps.py's Triton pass for prism, and for split the code torch.compile fuses.

From the projection of the anchor (per token and head: the gains before their bias, the extra keys,
the strength logits) and v (and, for prism, u): the directions d, the extra keys kx and the strengths
beta the recurrence takes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_megatron.kernels.fused.fusable import Fusable
from prism_megatron.kernels.fused.l2norm import l2norm


def prism_outputs(projection: torch.Tensor, gain_bias: torch.Tensor, strength_bias: torch.Tensor,
                  v: torch.Tensor, u: torch.Tensor | None, key_dim: int, key_norm: bool):
    """prism's elementwise part (fused: prism_steps.py). projection [N, H, >= L*V + (L-1)*K + S]: per
    token and head the gains (before their bias), the extra keys and S strength logits (S = L, or L-1
    where b^1 comes from x); v [N, H, V], u [N, H, V] (r^1 = v - u) or None (r^1 = v)
    -> d [N, H, L, V], kx [N, H, L-1, K] or None, beta [N, H, S]."""
    _, L, V = gain_bias.shape
    keys = (L - 1) * key_dim
    strengths = strength_bias.shape[1]
    gain = projection[..., : L * V].unflatten(-1, (L, V)) + gain_bias
    residual, steps = v if u is None else v - u, []
    for step in range(L):
        d = F.gelu(gain[:, :, step] * residual)
        steps.append(d)
        residual = residual - d
    kx = None
    if L > 1:
        kx = projection[..., L * V: L * V + keys].unflatten(-1, (L - 1, key_dim))
        kx = l2norm.eager(kx) if key_norm else kx
    beta = torch.sigmoid(projection[..., L * V + keys: L * V + keys + strengths] + strength_bias)
    return torch.stack(steps, dim=2), kx, beta


@Fusable
def split_outputs(projection: torch.Tensor, gain_bias: torch.Tensor, strength_bias: torch.Tensor,
                  v: torch.Tensor, base_logits: torch.Tensor, key_dim: int, key_norm: bool):
    """split's elementwise part. projection [N, H, >= L*V + L*K + L] (gains before their bias, keys,
    strength logits), v [N, H, V], base_logits [N, H] (the write along k) -> d [N, H, L+1, V] =
    [v, delta^1..delta^L], kx [N, H, L, K], beta [N, H, L+1]."""
    _, L, V = gain_bias.shape
    keys = L * key_dim
    share = torch.sigmoid(projection[..., : L * V].unflatten(-1, (L, V)) + gain_bias)
    rest, steps = v, [v]
    for step in range(L):
        steps.append(share[:, :, step] * rest)
        rest = rest * (1 - share[:, :, step])
    kx = projection[..., L * V: L * V + keys].unflatten(-1, (L, key_dim))
    kx = l2norm.eager(kx) if key_norm else kx
    logits = projection[..., L * V + keys: L * V + keys + L] + strength_bias
    beta = torch.sigmoid(torch.cat([base_logits.unsqueeze(-1), logits], -1))
    return torch.stack(steps, dim=2), kx, beta
