"""The PRISM mixer layer (PRISM.md section 3), sharded over TP by whole heads.

    x -> in_proj (one fused column-parallel GEMM) -> q^, k^, v^, [u^], z, a, [b]
      -> causal depthwise conv: SiLU on q, k, v; the anchor u = ShortConv(u^) has none
      -> q, k = l2norm(q), l2norm(k);  g = -exp(A_log) * softplus(a + dt_bias)
      -> solver -> d, kx, beta        (solver "none": d = v, beta = sigmoid(b), L = 1: Gated DeltaNet)
      -> o = prism_recurrence(q, k, d, kx, beta, g)
      -> RMSNorm(o) per head * SiLU(z) -> out_proj (row-parallel)

The fused in_proj output is laid out part by part (q, k, v, ...), each part split by heads, so a
TP rank's shard holds whole heads of every part and the rest of the layer is rank-local. The
convolution channels are the leading parts (q, k, v, [u]) of the same layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from torch import nn

from prism_megatron.config import ModelConfig
from prism_megatron.layers import (
    ColumnParallelLinear,
    RMSNorm,
    RowParallelLinear,
    causal_depthwise_conv,
    check_divides,
    conv_init,
    normal_init,
    sharded_parameter,
    upcast,
)
from prism_megatron.ops import prism_recurrence
from prism_megatron.parallel import tp_size
from prism_megatron.solver import PrismSolver, l2norm


def a_log_init(shape, gen, device):
    """A in [1, 16): per-head decay rates spread over scales, as Mamba-2 and Gated DeltaNet start."""
    return torch.empty(shape, device=device).uniform_(1.0, 16.0, generator=gen).log()


def dt_bias_init(shape, gen, device, dt_min: float = 1e-3, dt_max: float = 0.1):
    """softplus^-1 of time steps log-uniform in [dt_min, dt_max]."""
    u = torch.empty(shape, device=device).uniform_(0.0, 1.0, generator=gen)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class PrismMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, config: ModelParallelConfig, sequence_parallel: bool, out_init_std: float):
        super().__init__()
        check_divides("model.num_heads", cfg.num_heads)
        H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
        self.prism = cfg.solver == "prism"
        self.heads = H // tp_size()
        self.head_k_dim, self.head_v_dim = K, V
        self.backend = cfg.kernel_backend

        # Global sizes of the fused in_proj parts, in layout order; the conv runs on the leading ones.
        conv_parts = (H * K, H * K, H * V) + ((H * V,) if self.prism else ())
        gate_parts = (H * V, H) + (() if self.prism else (H,))  # z, a-logits, [b-logits]
        parts = conv_parts + gate_parts
        self.local_conv_parts = [p // tp_size() for p in conv_parts]
        self.local_gate_parts = [p // tp_size() for p in gate_parts]
        self.local_conv = sum(self.local_conv_parts)
        self.local_qkv = sum(self.local_conv_parts[:3])

        self.in_proj = ColumnParallelLinear(cfg.hidden_size, sum(parts), config=config, segments=parts,
                                            init=normal_init(cfg.init_std), sequence_parallel=sequence_parallel)
        self.conv_weight = sharded_parameter((self.local_conv, cfg.conv_size), conv_init(cfg.conv_size), config,
                                             segments=conv_parts)
        self.A_log = sharded_parameter((self.heads,), a_log_init, config)
        self.dt_bias = sharded_parameter((self.heads,), dt_bias_init, config)
        self.solver = (PrismSolver(self.heads, K, V, cfg.solver_steps, config=config, init_std=cfg.init_std)
                       if self.prism else None)
        # One weight shared by all heads, applied here to this rank's heads only: partial gradient.
        self.out_norm = RMSNorm(V, cfg.norm_eps, config, partial_input=True)
        self.out_proj = RowParallelLinear(H * V, cfg.hidden_size, config=config, init=normal_init(out_init_std),
                                          sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor, position: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """x: [B, T, D] normed (T/tp of it under sequence parallelism); position: [B, T] within each
        sequence; with cu_seqlens the batch is treated as one packed row of B*T tokens."""
        h = self.in_proj(x)
        B, T, _ = h.shape
        if cu_seqlens is not None:
            h = h.reshape(1, B * T, -1)
            position = position.reshape(1, B * T)
        conv = causal_depthwise_conv(h[..., : self.local_conv], self.conv_weight, position)
        q, k, v = F.silu(conv[..., : self.local_qkv]).split(self.local_conv_parts[:3], dim=-1)
        heads = h.shape[:2] + (self.heads, -1)
        q, k, v = l2norm(q.reshape(heads)), l2norm(k.reshape(heads)), v.reshape(heads)
        gates = h[..., self.local_conv:].split(self.local_gate_parts, dim=-1)
        z, a = gates[0].reshape(heads), gates[1]
        g = -torch.exp(upcast(self.A_log)) * F.softplus(upcast(a) + upcast(self.dt_bias))
        if self.prism:
            u = conv[..., self.local_qkv:].reshape(heads)
            d, kx, beta = self.solver(u, v)
        else:
            d, kx, beta = v.unsqueeze(3), None, torch.sigmoid(gates[2]).unsqueeze(3)
        o, _ = prism_recurrence(q, k, d, kx, beta.to(q.dtype), g, scale=self.head_k_dim**-0.5,
                                cu_seqlens=cu_seqlens, backend=self.backend)
        o = self.out_norm(o) * F.silu(z)
        return self.out_proj(o.reshape(B, T, -1))
