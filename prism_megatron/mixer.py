"""The PRISM mixer layer (docs/PRISM.md section 3), sharded over TP by whole heads.

    x -> in_proj (one fused column-parallel GEMM) -> q^, k^, v^, [u^], z, a, [b]
      -> causal depthwise conv: SiLU on q, k, v; the anchor u = ShortConv(u^) has none
      -> q, k = l2norm(q), l2norm(k);  g = -exp(A_log) * softplus(a + dt_bias)
      -> solver -> d, kx, beta        (solver "none": d = v, beta = sigmoid(b), L = 1: Gated DeltaNet;
                                       "split" takes b too, for its write of v along k, and "prism"
                                       with solver_erase_strength input, for b^1)
      -> o = prism_recurrence(q, k, d, kx, beta, g)
      -> RMSNorm(o) per head * SiLU(z) -> out_proj (row-parallel)

The fused in_proj output is laid out part by part (q, k, v, ...), each part split by heads, so a
TP rank's shard holds whole heads of every part and the rest of the layer is rank-local. The
convolution channels are the leading parts (q, k, v, [u]) of the same layout. `InProjLayout` is
that layout, the one description the mixer, its parameters' TP split and the tests read.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from prism_megatron.config import ModelConfig
from prism_megatron.kernels.fused.fusable import Fusable, upcast
from prism_megatron.kernels.fused.l2norm import l2norm
from prism_megatron.layers import (
    ColumnParallelLinear,
    RMSNorm,
    RowParallelLinear,
    check_divides,
    conv_init,
    gated_rms_norm,
    use_fused,
)
from prism_megatron.process_groups import tp_size
from prism_megatron.sharding import normal_init, sharded_parameter
from prism_megatron.solver import SOLVER_CLASSES
from prism_megatron.token_layout import TokenLayout


@dataclass(frozen=True)
class InProjLayout:
    """The fused in_proj's output parts in order, with their global sizes: q, k, v and (solvers prism
    and split) the anchor u pass through the short convolution; then the gate z, the decay logits a
    and (ModelConfig.erase_strength_from_input) the erase strength's logits b. Every part is split
    over TP by heads, so at TP size `tp` a rank holds size/tp of each, in the same order."""

    parts: tuple[tuple[str, int], ...]
    conv_parts: tuple[str, ...]

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> InProjLayout:
        H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
        anchor = cfg.solver != "none"
        conv = (("q", H * K), ("k", H * K), ("v", H * V)) + ((("u", H * V),) if anchor else ())
        gates = (("z", H * V), ("a", H)) + ((("b", H),) if cfg.erase_strength_from_input else ())
        return cls(conv + gates, tuple(name for name, _ in conv))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Global sizes in layout order (the in_proj weight's segments)."""
        return tuple(size for _, size in self.parts)

    @property
    def conv_sizes(self) -> tuple[int, ...]:
        """Global sizes of the convolution's channel parts (the conv weight's segments)."""
        return self.sizes[: len(self.conv_parts)]

    @property
    def gate_parts(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts[len(self.conv_parts):])

    def split(self, h: torch.Tensor, tp: int, names: tuple[str, ...]) -> list[torch.Tensor]:
        """A rank's slice [..., sum of the named parts' sizes / tp] of consecutive parts -> one
        tensor per part (views)."""
        size = dict(self.parts)
        return list(h.split([size[name] // tp for name in names], dim=-1))


def a_log_init(shape, gen, device):
    """A in [1, 16): per-head decay rates spread over scales, as Mamba-2 and Gated DeltaNet start."""
    return torch.empty(shape, device=device).uniform_(1.0, 16.0, generator=gen).log()


def dt_bias_init(shape, gen, device, dt_min: float = 1e-3, dt_max: float = 0.1):
    """softplus^-1 of time steps log-uniform in [dt_min, dt_max]."""
    u = torch.empty(shape, device=device).uniform_(0.0, 1.0, generator=gen)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


@Fusable
def decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """g = -exp(A_log) * softplus(a + dt_bias), in float32."""
    return -torch.exp(upcast(A_log)) * F.softplus(upcast(a) + upcast(dt_bias))


class PrismMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, megatron_config: ModelParallelConfig, sequence_parallel: bool,
                 out_init_std: float):
        super().__init__()
        check_divides("model.num_heads", cfg.num_heads)
        H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
        self.heads = H // tp_size()
        self.head_k_dim, self.head_v_dim = K, V
        self.backend = cfg.kernel_backend
        self.fused_ops = cfg.fused_ops
        self.recompute_heads = cfg.recompute == "selective"

        self.layout = InProjLayout.for_config(cfg)
        self.local_conv = sum(self.layout.conv_sizes) // tp_size()

        self.in_proj = ColumnParallelLinear(cfg.hidden_size, sum(self.layout.sizes), megatron_config=megatron_config,
                                            segments=self.layout.sizes,
                                            init=normal_init(cfg.init_std), sequence_parallel=sequence_parallel)
        self.conv_weight = sharded_parameter((self.local_conv, cfg.conv_size), conv_init(cfg.conv_size),
                                             megatron_config, segments=self.layout.conv_sizes)
        self.A_log = sharded_parameter((self.heads,), a_log_init, megatron_config)
        self.dt_bias = sharded_parameter((self.heads,), dt_bias_init, megatron_config)
        self.solver = (SOLVER_CLASSES[cfg.solver](cfg, self.heads, megatron_config=megatron_config)
                       if cfg.solver != "none" else None)
        # One weight shared by all heads, applied here to this rank's heads only: partial gradient.
        self.out_norm = RMSNorm(V, cfg.norm_eps, megatron_config, partial_input=True, fused_ops=cfg.fused_ops)
        self.out_proj = RowParallelLinear(H * V, cfg.hidden_size, megatron_config=megatron_config,
                                          init=normal_init(out_init_std), sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor, sequences: TokenLayout) -> torch.Tensor:
        """x: [B, T, D] normed (T/tp of it under sequence parallelism), rows that `sequences` says how
        to join into sequences (token_layout.py)."""
        h = self.in_proj(x)
        B, T, _ = h.shape
        layout, tp = self.layout, tp_size()
        conv_input, gates = self.split_conv(h)
        # Outside the recomputed parts, so that a halo that takes a collective (context parallelism) is
        # formed once and kept.
        halo = sequences.conv_halo(conv_input, self.conv_weight.shape[1] - 1)
        z, a, *b = layout.split(sequences.pack(gates), tp, layout.gate_parts)
        args = (sequences, conv_input, halo, a, b[0] if b else None)
        o = checkpoint(self.mix, *args, use_reentrant=False) if self.recompute_heads else self.mix(*args)
        norm = functools.partial(self.gated_norm, use_fused(self.fused_ops, h), (B, T, -1))
        return self.out_proj.of(norm, o, z.reshape(o.shape), self.out_norm.weight)

    def mix(self, sequences: TokenLayout, conv_input: torch.Tensor, halo: torch.Tensor | None, a: torch.Tensor,
            b: torch.Tensor | None) -> torch.Tensor:
        """in_proj's outputs (the convolution's channels and the halo before them, the decay and, where
        in_proj makes it, the erase strength's logits) -> the recurrence's output
        per head: what model.recompute = selective re-runs in the backward."""
        fused = use_fused(self.fused_ops, conv_input)
        # Nothing between in_proj's output (kept anyway) and the recurrence is kept for the backward: the
        # convolution's output (at 1.3B, 16 KiB a token and layer) and the solver's intermediates are
        # formed again there. Without autograd (evaluation, generation) there is no backward to form them.
        inputs = (sequences, fused, conv_input, halo, b)
        q, k, d, kx, beta = (checkpoint(self.recurrence_inputs, *inputs, use_reentrant=False)
                             if torch.is_grad_enabled() else self.recurrence_inputs(*inputs))
        g = decay(fused, a, self.A_log, self.dt_bias)
        return sequences.recurrence(q, k, d, kx, beta.to(q.dtype), g, self.head_k_dim**-0.5, self.backend)

    def recurrence_inputs(self, sequences: TokenLayout, fused: bool, conv_input: torch.Tensor,
                          halo: torch.Tensor | None, b: torch.Tensor | None):
        """The short convolution, the normalised q and k, and the solver's directions, extra keys and
        strengths -> q, k, d, kx, beta."""
        layout, tp = self.layout, tp_size()
        silu_channels = sum(layout.conv_sizes[:3]) // tp
        conv = sequences.short_conv(fused, conv_input, self.conv_weight, silu_channels, halo)
        q, k, v, *u = layout.split(conv, tp, layout.conv_parts)
        heads = conv.shape[:2] + (self.heads, -1)
        q, k, v = l2norm(fused, q.reshape(heads)), l2norm(fused, k.reshape(heads)), v.reshape(heads)
        if self.solver is None:
            return q, k, v.unsqueeze(3), None, torch.sigmoid(b).unsqueeze(3)
        # The solver takes b where in_proj makes it: split's write along k, prism's b^1 from x.
        return (q, k, *self.solver(u[0].reshape(heads), v, b, fused))

    def gated_norm(self, fused: bool, shape: tuple[int, ...], o: torch.Tensor, z: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm(o) * SiLU(z) per head, as out_proj's input of `shape` (which out_proj's backward
        recomputes rather than keeps)."""
        return gated_rms_norm(fused, o, z, weight, self.out_norm.eps).reshape(shape)

    def split_conv(self, h: torch.Tensor) -> list[torch.Tensor]:
        """in_proj's output -> (the convolution's channels, the gates). One split, so the backward
        joins the two gradients in one pass (two slices would each pad theirs to h's width first)."""
        return list(h.split([self.local_conv, h.shape[-1] - self.local_conv], dim=-1))
