"""The solvers (docs/SOLVERS.md): update directions, extra write keys and write strengths from the
anchor u and the value v, per head and token.

prism, the paper's (PRISM.md section 2, Eq. 9-16):
    r^1 = v - u;  for l = 1..L:  d^l = GELU((W_p^l u + bias_p^l) * r^l),  r^l+1 = r^l - d^l
    kappa^l = l2norm(W_k^l u) (l >= 2),  b^l = sigmoid(w_b^l . u + c^l)
split, the authors' LM form: Gated DeltaNet's write of v along k (strength sigmoid(b)), then L writes
    P^l = sigmoid(W_p^l u + bias_p^l),  delta^l = P^l * prod_{j<l} (1 - P^j) * v
    kappa^l = W_k^l u (l2norm optional),  b^l = sigmoid(w_b^l . u + c^l)

Token-local, so under TP each rank holds the weights of its own heads and never communicates; the
maps W_p and W_k are per head, full or of a low rank (AnchorMaps). All L gains, keys and strengths
come from one batched einsum each; only the chain over l is sequential.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from torch import nn

from prism_megatron.config import ModelConfig
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
def split_directions(gain: torch.Tensor, gain_bias: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stick-breaking shares of v: gain [B, T, H, L, V] (before its bias), v [B, T, H, V] ->
    [v, delta^1, ..., delta^L] [B, T, H, L+1, V]."""
    share = torch.sigmoid(gain + gain_bias)
    rest, steps = v, [v]
    for step in range(share.shape[3]):
        steps.append(share[:, :, :, step] * rest)
        rest = rest * (1 - share[:, :, :, step])
    return torch.stack(steps, dim=3)


@fused_on_cuda
def strengths(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits + bias)


class AnchorMaps(nn.Module):
    """What the solvers share: parameters of this rank's heads, and per-head linear maps of the anchor
    u [B, T, H, V] to n vectors of size m each, [B, T, H, n, m]. A map is a full matrix per head and
    output, `{name}_weight` [H, n, m, V], or at rank r a down map shared by the n outputs and an up
    map per output, `{name}_down` [H, r, V] and `{name}_up` [H, n, m, r]. The names seed the
    weights' draws (PrismLM.reset_parameters), so the full maps keep the names they always had."""

    def __init__(self, local_heads: int, head_v_dim: int, rank: int | None, config: ModelParallelConfig):
        super().__init__()
        self.heads, self.head_v_dim, self.rank, self.parallel_config = local_heads, head_v_dim, rank, config

    def head_param(self, shape: tuple[int, ...], init) -> nn.Parameter:
        return sharded_parameter((self.heads,) + shape, init, self.parallel_config)

    def add_map(self, name: str, outputs: int, size: int, std: float) -> None:
        V, r = self.head_v_dim, self.rank
        if r is None:
            setattr(self, f"{name}_weight", self.head_param((outputs, size, V), normal_init(std)))
        else:
            # up @ down then has entries of the full matrix's std: var = r * (std^2 V / r) * (1 / V).
            setattr(self, f"{name}_down", self.head_param((r, V), normal_init(V**-0.5)))
            setattr(self, f"{name}_up", self.head_param((outputs, size, r), normal_init(std * (V / r) ** 0.5)))

    def apply_map(self, name: str, u: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return torch.einsum("bthv,hlwv->bthlw", u, getattr(self, f"{name}_weight"))
        low = torch.einsum("bthv,hrv->bthr", u, getattr(self, f"{name}_down"))
        return torch.einsum("bthr,hlwr->bthlw", low, getattr(self, f"{name}_up"))


class PrismSolver(AnchorMaps):
    def __init__(self, cfg: ModelConfig, local_heads: int, *, config: ModelParallelConfig):
        super().__init__(local_heads, cfg.head_v_dim, cfg.solver_rank, config)
        K, V, L, init = cfg.head_k_dim, cfg.head_v_dim, cfg.solver_steps, cfg.solver_init
        # W_p starts small and (by default) its bias at 1, so that d^1 starts near GELU(v - u).
        self.add_map("gain", L, V, cfg.init_std)
        self.gain_bias = self.head_param((L, V), constant_init(init.gain_bias))
        if L > 1:
            self.add_map("key", L - 1, K, V**-0.5)
        self.strength_weight = self.head_param((L, V), normal_init(cfg.init_std))
        self.strength_bias = self.head_param((L,), constant_init(init.strength_bias))
        self.steps, self.key_norm = L, init.key_norm

    def forward(self, u: torch.Tensor, v: torch.Tensor):
        """u, v: [B, T, H, V] -> d [B, T, H, L, V], kx [B, T, H, L-1, K] or None, beta [B, T, H, L]."""
        d = directions(self.apply_map("gain", u), self.gain_bias, v, u)
        beta = strengths(torch.einsum("bthv,hlv->bthl", u, self.strength_weight), self.strength_bias)
        kx = None
        if self.steps > 1:
            kx = self.apply_map("key", u)
            kx = l2norm(kx) if self.key_norm else kx
        return d, kx, beta


class SplitSolver(AnchorMaps):
    """Gated DeltaNet's write of v along k, plus L writes that split v by stick-breaking gains, each
    along its own key from the anchor (docs/SOLVERS.md section 2): L + 1 directions."""

    def __init__(self, cfg: ModelConfig, local_heads: int, *, config: ModelParallelConfig):
        super().__init__(local_heads, cfg.head_v_dim, cfg.solver_rank, config)
        K, V, L, init = cfg.head_k_dim, cfg.head_v_dim, cfg.solver_steps, cfg.solver_init
        self.add_map("gain", L, V, cfg.init_std)
        self.gain_bias = self.head_param((L, V), constant_init(init.gain_bias))
        self.add_map("key", L, K, V**-0.5)
        self.strength_weight = self.head_param((L, V), normal_init(cfg.init_std))
        self.strength_bias = self.head_param((L,), constant_init(init.strength_bias))
        self.key_norm = init.key_norm

    def forward(self, u: torch.Tensor, v: torch.Tensor, base_logits: torch.Tensor):
        """u, v: [B, T, H, V], base_logits [B, T, H] (the write along k) -> d [B, T, H, L+1, V],
        kx [B, T, H, L, K], beta [B, T, H, L+1]."""
        d = split_directions(self.apply_map("gain", u), self.gain_bias, v)
        kx = self.apply_map("key", u)
        kx = l2norm(kx) if self.key_norm else kx
        beta = torch.cat([torch.sigmoid(base_logits).unsqueeze(3),
                          strengths(torch.einsum("bthv,hlv->bthl", u, self.strength_weight), self.strength_bias)], 3)
        return d, kx, beta


SOLVER_CLASSES = {"prism": PrismSolver, "split": SplitSolver}
