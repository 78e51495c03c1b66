"""FLOPs of one PrismLM training step per token, the numerator of MFU (docs/FLOPS.md derives every term).

    flops = step_flops(model_config, seq_length)   # the whole model, all TP and CP ranks together
    flops.total, flops.six_n                       # forward + backward per token: exact, and 6N
    mfu(flops.total, tokens_per_sec, num_gpus, peak_flops())

A product of an [m, k] and a [k, n] matrix counts 2mkn. Counted: every weight product (2 FLOPs a
weight a token forward, 4 backward), and the PRISM recurrence as the Triton chunk kernels compute it
(kernels/prism/), forward and backward. Not counted, as MFU leaves them out: products the backward
forms again (reported as `recurrence_recomputed`), activation recomputation, the LM head's logits
that the fused cross-entropy recomputes in its backward, vocabulary padding, the zero rows that align
a column-parallel linear's width (layers.ALIGN_COLUMNS), context parallelism's
second pass of the recurrence; and elementwise work (norms, activations, decays, the solver's
residual chain: under 1% of the total). Document resets are ignored: every sequence is taken to be
seq_length tokens long.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from prism_megatron.config import ModelConfig
from prism_megatron.kernels.prism.launch_config import CHUNK
from prism_megatron.kernels.prism.solve import SUB
from prism_megatron.layers import ALIGN_COLUMNS
from prism_megatron.mixer import InProjLayout

# Dense bf16 tensor-core FLOP/s of the GPUs this project runs on, by torch.cuda.get_device_name: SXM
# boards (an H200 NVL reports "NVIDIA H200" too, and peaks lower). Other devices: PRISM_PEAK_FLOPS, or no MFU.
PEAK_BF16_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}
PEAK_FLOPS_ENV = "PRISM_PEAK_FLOPS"


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per token of one forward and backward of the whole model."""

    gemm: float                   # the weight products: 6 x the weights applied by matrix products
    recurrence_forward: float     # the PRISM chunk kernels' forward, all layers
    recurrence_backward: float    # their backward, without the products it forms again
    recurrence_recomputed: float  # the products the backward forms again (not model FLOPs)
    solver_extra: float           # the solver's products beyond 6 a weight (not model FLOPs, solver_extra)
    six_n: float                  # 6N, N the parameters without the input embedding

    @property
    def total(self) -> float:
        return self.gemm + self.recurrence_forward + self.recurrence_backward


@dataclass(frozen=True)
class ChunkFlops:
    """The recurrence's FLOPs per chunk of CHUNK tokens and per head."""

    forward: int
    backward: int
    recomputed: int


def step_flops(cfg: ModelConfig, seq_length: int) -> StepFlops:
    """Per token, for sequences of seq_length tokens (the kernels run whole chunks, so a partial last
    chunk costs as much as a full one)."""
    chunk = chunk_flops(cfg.head_k_dim, cfg.head_v_dim, cfg.write_steps)
    per_token = cfg.num_layers * cfg.num_heads * -(-seq_length // CHUNK) / seq_length
    return StepFlops(gemm=6 * gemm_parameters(cfg), recurrence_forward=per_token * chunk.forward,
                     recurrence_backward=per_token * chunk.backward,
                     recurrence_recomputed=per_token * chunk.recomputed,
                     solver_extra=cfg.num_layers * cfg.num_heads * solver_extra(cfg),
                     six_n=6 * non_embedding_parameters(cfg))


def chunk_flops(K: int, V: int, L: int) -> ChunkFlops:
    """The matrix products of kernels/prism/'s kernels on one chunk of one head, kernel by kernel. A
    product a kernel forms once per block of value columns (at V above the block width) counts once."""
    C, E = CHUNK, L - 1  # E extra write keys
    p_k = 2 * C * C * K  # a [C, K] x [K, C] or [C, C] x [C, K] product, e.g. Q K^T
    p_v = 2 * C * C * V  # a [C, C] x [C, V] product, or one that sums over V into [C, C], e.g. P U
    p_s = 2 * C * K * V  # a product with a K x V state, or one that forms it, e.g. W^ S_0
    sub = SUB.value      # solve.py handles the chunk as blocks of sub rows
    blocks = C // sub
    solve = (blocks * (blocks + 1) // 2 * 2 * sub * sub * K  # A's blocks on and below the diagonal
             + blocks * (sub - 1) * 2 * sub * sub            # each diagonal block's inverse, row by row
             # T_ij = -T_ii sum_{j<=m<i} A_im T_mj: i - j + 1 block products per block below the diagonal
             + sum((blocks - d) * (d + 1) for d in range(1, blocks)) * 2 * sub**3)
    forward = (solve
               + (1 + E) * (p_k + p_v)   # wy_fwd: W^ = T X, U~ = T R; per extra key K Kappa^T, B W
               + (2 + E) * p_s           # state_fwd: W^ S_0, K^T U; per extra key Kappa^T W
               + p_s + L * (p_k + p_v))  # output: Q S_0; per key Q K^T and its product with U or W
    backward = (p_v                      # du_local: P^T dO
                + 3 * p_s                # state_bwd: K dS, Q^T dO, W^T dU
                # pseudo_value_grad: dU S_0^T; T^T dU, dR U~^T; T^T dW^, dX W^T
                + p_s + 2 * p_v + 2 * p_k
                # output_state_grad: dO S_0^T, U dS^T; dO U^T; dP K, (U dO^T) Q; per extra key all but dO S_0^T
                + 2 * p_s + p_v + 2 * p_k + E * (p_s + p_v + 2 * p_k)
                + E * (p_s + 3 * p_v)    # extra_key_grad: Kappa dS; dR W^T, P^T dO, B^T dR
                + (1 + E) * 2 * p_k)     # wy_bwd: Y K, Y^T K; per extra key Y Kappa, Y^T K
    # Formed again in the backward: Q K^T (du_local, output_state_grad), U dO^T (the transpose of dO U^T:
    # no kernel transposes a product, tiles.py says why), K K^T (wy_bwd); per extra key Q Kappa^T
    # (output_state_grad, extra_key_grad), W dO^T, K Kappa^T (extra_key_grad, wy_bwd).
    recomputed = 3 * p_k + p_v + E * (4 * p_k + p_v)
    return ChunkFlops(forward, backward, recomputed)


def gemm_parameters(cfg: ModelConfig) -> int:
    """The weights applied by matrix products, each once per token: in_proj, out_proj, the solver's
    per-head maps and strength vectors, the MLP and the LM head (the embedding's matrix, if tied)."""
    D, H, V = cfg.hidden_size, cfg.num_heads, cfg.head_v_dim
    mixer = D * sum(InProjLayout.for_config(cfg).sizes) + H * V * D + H * solver_weights(cfg)
    return cfg.num_layers * (mixer + 3 * D * cfg.ffn_hidden_size) + D * cfg.vocab_size


def solver_maps(cfg: ModelConfig) -> list[int]:
    """The output sizes of a head's maps from the anchor: the gains (L x V) and the extra keys."""
    if cfg.solver == "none":
        return []
    L, K, V = cfg.solver_steps, cfg.head_k_dim, cfg.head_v_dim
    keys = (L - 1 if cfg.solver == "prism" else L) * K
    return [L * V] + ([keys] if keys else [])


def solver_weights(cfg: ModelConfig) -> int:
    """A head's solver weights, each applied once a token: its maps (a low-rank map as its two factors)
    and the strength vectors."""
    if cfg.solver == "none":
        return 0
    V, r = cfg.head_v_dim, cfg.solver_rank
    maps = sum(m * V if r is None else r * V + m * r for m in solver_maps(cfg))
    return maps + cfg.anchor_strengths * V


def solver_extra(cfg: ModelConfig) -> int:
    """A head's solver products a token beyond 6 a weight: solver.AnchorMaps.project applies the maps
    and strengths as one matrix of P columns (a low-rank map multiplied out, zero columns up to
    ALIGN_COLUMNS), forward, again in the backward, and twice for the gradients: 8 P V. (Multiplying
    out a low-rank map costs per step, not per token: not counted.)"""
    if cfg.solver == "none":
        return 0
    width = sum(solver_maps(cfg)) + cfg.anchor_strengths
    width += -width % ALIGN_COLUMNS
    return 8 * width * cfg.head_v_dim - 6 * solver_weights(cfg)


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """N of 6N: every parameter but the input embedding's (a tied embedding counts, as the LM head)."""
    D, H, V = cfg.hidden_size, cfg.num_heads, cfg.head_v_dim
    # Per layer: the two block norms, the output norm, the short convolution's taps, A_log and dt_bias.
    vectors = 2 * D + V + sum(InProjLayout.for_config(cfg).conv_sizes) * cfg.conv_size + 2 * H
    if cfg.solver != "none":
        vectors += H * (cfg.solver_steps * V + cfg.anchor_strengths)  # the gain and strength biases
    return gemm_parameters(cfg) + cfg.num_layers * vectors + D  # + the final norm


def peak_flops() -> float | None:
    """This process's device's dense bf16 FLOP/s: PRISM_PEAK_FLOPS if set, else the current GPU's from
    PEAK_BF16_FLOPS; None otherwise (the CPU, other GPUs)."""
    if PEAK_FLOPS_ENV in os.environ:
        try:
            return float(os.environ[PEAK_FLOPS_ENV])
        except ValueError:
            raise ValueError(f"{PEAK_FLOPS_ENV} must be a number of FLOP/s (989e12 for an H100 SXM), "
                             f"got {os.environ[PEAK_FLOPS_ENV]!r}") from None
    if not torch.cuda.is_available():
        return None
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name())


def mfu(flops_per_token: float, tokens_per_sec: float, num_gpus: int, peak: float) -> float:
    """Model FLOPs utilisation: the FLOPs per second each of num_gpus devices does for the model, over
    one device's peak. Every rank does 1/(TP x CP x DP) of the model's FLOPs (docs/FLOPS.md)."""
    return flops_per_token * tokens_per_sec / (num_gpus * peak)
