"""The solvers (docs/SOLVERS.md): update directions, extra write keys and write strengths from the
anchor u and the value v, per head and token.

prism, the paper's (docs/PRISM.md section 2, Eq. 9-16):
    r^1 = v - u;  for l = 1..L:  d^l = GELU((W_p^l u + bias_p^l) * r^l),  r^l+1 = r^l - d^l
    kappa^l = l2norm(W_k^l u) (l >= 2),  b^l = sigmoid(w_b^l . u + c^l)
  with options (docs/SOLVERS.md section 4): r^1 = v; b^1 = sigmoid(b) from in_proj, as Gated DeltaNet's.
split, the authors' LM form: Gated DeltaNet's write of v along k (strength sigmoid(b)), then L writes
    P^l = sigmoid(W_p^l u + bias_p^l),  delta^l = P^l * prod_{j<l} (1 - P^j) * v
    kappa^l = W_k^l u (l2norm optional),  b^l = sigmoid(w_b^l . u + c^l)

Token-local, so under TP each rank holds the weights of its own heads and never communicates; the
maps W_p and W_k are per head, full or of a low rank (AnchorMaps). A solver's gains, keys and
strength logits come from one GEMM of the anchor per head (all heads in one batched GEMM,
HeadwiseLinear), then one elementwise pass in which only the chain over l is sequential (kernels/solver):
for prism a Triton kernel each way where the model's ops are fused, for split the PyTorch code through
torch.compile. The
mixer runs the solver inside the checkpoint that also covers the short convolution
(PrismMixer.recurrence_inputs), so none of its intermediates is kept for the backward: they are
formed again there (one more GEMM and elementwise pass).
"""
from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig
from torch import nn

from prism_megatron.config import ModelConfig
from prism_megatron.kernels.solver import prism_outputs, prism_steps, split_outputs
from prism_megatron.layers import ALIGN_COLUMNS
from prism_megatron.sharding import constant_init, normal_init, sharded_parameter


class HeadwiseLinear(torch.autograd.Function):
    """y[n, h] = weight[h] @ x[n, h] for x [N, H, I] (rows may be strided) and weight [H, O, I] ->
    y [N, H, O]: one batched GEMM over heads that reads x and writes y token-major (strided batches),
    so that neither goes through a transposed copy."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        y = x.new_empty(x.shape[0], x.shape[1], weight.shape[1])
        torch.bmm(x.transpose(0, 1), weight.transpose(1, 2), out=y.transpose(0, 1))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy_heads = dy.transpose(0, 1)
        dx = x.new_empty(x.shape)
        torch.bmm(dy_heads, weight, out=dx.transpose(0, 1))
        return dx, torch.bmm(dy_heads.transpose(1, 2), x.transpose(0, 1))


def key_init_std(cfg: ModelConfig) -> float:
    """The init std of the map W_k to the extra keys: by default V^-1/2, so that an unnormalised key
    starts with about the anchor's norm times sqrt(K/V)."""
    return cfg.head_v_dim**-0.5 if cfg.solver_key_init_std is None else cfg.solver_key_init_std


class AnchorMaps(nn.Module):
    """What the solvers share: parameters of this rank's heads, and per-head linear maps of the anchor
    u to n vectors of size m each. A map is a full matrix per head and output, `{name}_weight`
    [H, n, m, V], or at rank r a down map shared by the n outputs and an up map per output,
    `{name}_down` [H, r, V] and `{name}_up` [H, n, m, r]. The names seed the weights' draws
    (PrismLM.reset_parameters), so the full maps keep the names they always had."""

    def __init__(self, local_heads: int, head_v_dim: int, rank: int | None, megatron_config: ModelParallelConfig):
        super().__init__()
        self.heads, self.head_v_dim, self.rank = local_heads, head_v_dim, rank
        self.megatron_config = megatron_config

    def head_param(self, shape: tuple[int, ...], init) -> nn.Parameter:
        return sharded_parameter((self.heads,) + shape, init, self.megatron_config)

    def add_map(self, name: str, outputs: int, size: int, std: float) -> None:
        V, r = self.head_v_dim, self.rank
        if r is None:
            setattr(self, f"{name}_weight", self.head_param((outputs, size, V), normal_init(std)))
        else:
            # up @ down then has entries of the full matrix's std: var = r * (std^2 V / r) * (1 / V).
            setattr(self, f"{name}_down", self.head_param((r, V), normal_init(V**-0.5)))
            setattr(self, f"{name}_up", self.head_param((outputs, size, r), normal_init(std * (V / r) ** 0.5)))

    def map_matrix(self, name: str) -> torch.Tensor:
        """The map as one matrix per head, [H, n*m, V] (a low-rank map's factors multiplied: a product of
        the weights' size, not the tokens')."""
        if self.rank is None:
            return getattr(self, f"{name}_weight").flatten(1, 2)
        return getattr(self, f"{name}_up").flatten(1, 2) @ getattr(self, f"{name}_down")

    def project(self, u: torch.Tensor, maps: tuple[str, ...]) -> torch.Tensor:
        """u [N, H, V] -> [N, H, P]: the maps' outputs, then the strength logits, then zero columns up to a
        multiple of ALIGN_COLUMNS."""
        weights = [self.map_matrix(name) for name in maps] + [self.strength_weight]
        pad = -sum(w.shape[1] for w in weights) % ALIGN_COLUMNS
        if pad:
            weights.append(weights[0].new_zeros(self.heads, pad, self.head_v_dim))
        return HeadwiseLinear.apply(u, torch.cat(weights, 1))

    def forward(self, u: torch.Tensor, v: torch.Tensor, base_logits: torch.Tensor | None, fused: bool):
        """u, v: [B, T, H, V]; base_logits [B, T, H] for the split solver's write along k (else None) ->
        d [B, T, H, L', V], kx [B, T, H, L'-1, K] or None, beta [B, T, H, L'], L' the write directions."""
        tokens = u.shape[:2]
        flat = [None if x is None else x.flatten(0, 1) for x in (u, v, base_logits)]
        outputs = self.solve(*flat, fused)
        return tuple(None if x is None else x.unflatten(0, tokens) for x in outputs)


class PrismSolver(AnchorMaps):
    def __init__(self, cfg: ModelConfig, local_heads: int, *, megatron_config: ModelParallelConfig):
        super().__init__(local_heads, cfg.head_v_dim, cfg.solver_rank, megatron_config)
        K, V, L, init = cfg.head_k_dim, cfg.head_v_dim, cfg.solver_steps, cfg.solver_init
        # W_p starts small and (by default) its bias at 1, so that d^1 starts near GELU(v - u).
        self.add_map("gain", L, V, cfg.init_std)
        self.gain_bias = self.head_param((L, V), constant_init(init.gain_bias))
        if L > 1:
            self.add_map("key", L - 1, K, key_init_std(cfg))
        # The strengths from the anchor: b^1 (unless in_proj makes it from x, as Gated DeltaNet's), then
        # those of the writes that never erase.
        extra = init.strength_bias if cfg.solver_extra_strength_bias is None else cfg.solver_extra_strength_bias
        first = [] if cfg.erase_strength_from_input else [init.strength_bias]
        biases = first + [extra] * (L - 1)
        self.strength_weight = self.head_param((cfg.anchor_strengths, V), normal_init(cfg.init_std))
        self.strength_bias = self.head_param((cfg.anchor_strengths,), constant_init(biases))
        self.maps = ("gain", "key") if L > 1 else ("gain",)
        self.key_dim, self.key_norm = K, init.key_norm
        self.subtract_anchor = cfg.solver_first_residual != "v"

    def solve(self, u: torch.Tensor, v: torch.Tensor, base_logits: torch.Tensor | None, fused: bool):
        outputs = prism_steps if fused else prism_outputs
        d, kx, beta = outputs(self.project(u, self.maps), self.gain_bias, self.strength_bias, v,
                              u if self.subtract_anchor else None, self.key_dim, self.key_norm)
        if base_logits is None:
            return d, kx, beta
        return d, kx, torch.cat([torch.sigmoid(base_logits).unsqueeze(-1), beta], -1)


class SplitSolver(AnchorMaps):
    """Gated DeltaNet's write of v along k, plus L writes that split v by stick-breaking gains, each
    along its own key from the anchor (docs/SOLVERS.md section 2): L + 1 directions."""

    def __init__(self, cfg: ModelConfig, local_heads: int, *, megatron_config: ModelParallelConfig):
        super().__init__(local_heads, cfg.head_v_dim, cfg.solver_rank, megatron_config)
        K, V, L, init = cfg.head_k_dim, cfg.head_v_dim, cfg.solver_steps, cfg.solver_init
        self.add_map("gain", L, V, cfg.init_std)
        self.gain_bias = self.head_param((L, V), constant_init(init.gain_bias))
        self.add_map("key", L, K, key_init_std(cfg))
        self.strength_weight = self.head_param((L, V), normal_init(cfg.init_std))
        self.strength_bias = self.head_param((L,), constant_init(init.strength_bias))
        self.key_dim, self.key_norm = K, init.key_norm

    def solve(self, u: torch.Tensor, v: torch.Tensor, base_logits: torch.Tensor, fused: bool):
        return split_outputs(fused, self.project(u, ("gain", "key")), self.gain_bias, self.strength_bias, v,
                             base_logits, self.key_dim, self.key_norm)


SOLVER_CLASSES = {"prism": PrismSolver, "split": SplitSolver}
