"""Model and parallelism configuration: plain dataclasses, filled from the `model:` and `parallel:`
sections of a run's YAML (launch/config.py reads the file)."""
from __future__ import annotations

from dataclasses import dataclass

SOLVERS = ("prism", "none")
RECOMPUTE = ("none", "selective", "full")
FUSED_OPS = ("auto", "on", "off")


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
    # Activation recomputation in the backward: "selective" re-runs each mixer's part between its two
    # GEMMs (convolution, norms, solver, recurrence, gate), keeping the GEMMs' inputs; "full" re-runs
    # whole blocks, keeping only their inputs.
    recompute: str = "none"
    # The layer's glue (short convolution, norms, solver, SwiGLU) as fused kernels or as
    # the PyTorch code they replace: "auto" fuses on CUDA, "on" everywhere, "off" nowhere (layers.use_fused).
    fused_ops: str = "auto"

    @property
    def write_steps(self) -> int:
        """L, the number of write directions per token (1 for Gated DeltaNet)."""
        return 1 if self.solver == "none" else self.solver_steps

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot build a model."""
        if self.solver not in SOLVERS:
            raise ValueError(f"model.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"model.recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.fused_ops not in FUSED_OPS:
            raise ValueError(f"model.fused_ops must be one of {FUSED_OPS}, got {self.fused_ops!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_k_dim", "head_v_dim",
                     "ffn_hidden_size", "solver_steps", "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError(f"model.norm_eps and model.init_std must be > 0, got {self.norm_eps}, {self.init_std}")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    # Shard the activations between blocks along the sequence over the TP group.
    sequence_parallel: bool = False
    # Split each sample's tokens into this many contiguous slices, one per rank (context_parallel.py).
    context_parallel_size: int = 1
