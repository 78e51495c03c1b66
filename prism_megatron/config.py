"""Model configuration: a plain dataclass, filled from the `model:` section of a run's YAML."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    head_k_dim: int = 64
    head_v_dim: int = 64
    ffn_hidden_size: int = 704
    # "prism": the solver of PRISM.md section 2 with `solver_steps` write directions;
    # "none": d^1 = v, L = 1, exactly Gated DeltaNet (the baseline and a test oracle).
    solver: str = "prism"
    solver_steps: int = 3
    conv_size: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    # Backend of prism_recurrence: "auto" (triton on CUDA, torch otherwise), "torch", "triton", "naive".
    kernel_backend: str = "auto"
