"""Model and parallelism configuration: plain dataclasses, filled from the `model:` and `parallel:`
sections of a run's YAML (launch/config.py reads the file)."""
from __future__ import annotations

from dataclasses import dataclass

SOLVERS = ("prism", "split", "none")
# prism's first residual r^1 (docs/SOLVERS.md section 2): Eq. 14's v - u, or v.
FIRST_RESIDUALS = ("v-u", "v")
# Where prism's erase strength b^1 comes from: the anchor (Eq. 11), or in_proj's b from the layer input
# x, as Gated DeltaNet's.
ERASE_STRENGTHS = ("anchor", "input")
RECOMPUTE = ("none", "selective", "full")
FUSED_OPS = ("auto", "on", "off")
# Write directions per token that the Triton kernel takes (tested for L = 1..4).
MAX_WRITE_DIRECTIONS = 4


@dataclass(frozen=True)
class SolverInit:
    """A solver's key normalisation and the initial biases of its gains and strengths."""

    key_norm: bool
    gain_bias: float
    strength_bias: float


# What model.solver_key_norm, solver_gain_bias and solver_strength_bias mean when left unset
# (docs/SOLVERS.md says why each).
SOLVER_INIT = {"prism": SolverInit(key_norm=True, gain_bias=1.0, strength_bias=0.0),
               "split": SolverInit(key_norm=False, gain_bias=0.0, strength_bias=2.0)}


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    head_k_dim: int = 64
    head_v_dim: int = 64
    ffn_hidden_size: int = 704
    # The solvers of docs/SOLVERS.md. "prism": the paper's (Eq. 9-16), `solver_steps` write directions
    # from the anchor; "split": Gated DeltaNet's write of v along k plus `solver_steps` writes that
    # split v by stick-breaking gains along keys from the anchor (the authors' LM form); "none":
    # d^1 = v, L = 1, exactly Gated DeltaNet (the baseline and a test oracle).
    solver: str = "prism"
    solver_steps: int = 3
    # Rank of each head's maps from the anchor to the gains and to the extra keys; unset: full matrices.
    solver_rank: int | None = None
    # L2-normalise the extra write keys; initial gain and strength biases. Unset: the solver's own
    # default, SOLVER_INIT.
    solver_key_norm: bool | None = None
    solver_gain_bias: float | None = None
    solver_strength_bias: float | None = None
    # prism's first residual r^1 (FIRST_RESIDUALS, unset: v-u) and where its erase strength b^1 comes
    # from (ERASE_STRENGTHS, unset: anchor): docs/SOLVERS.md section 2.
    solver_first_residual: str | None = None
    solver_erase_strength: str | None = None
    # The initial strength bias of prism's writes 2..L, which never erase (unset: solver_strength_bias).
    solver_extra_strength_bias: float | None = None
    # The init std of the map from the anchor to the extra keys (unset: head_v_dim^-1/2).
    solver_key_init_std: float | None = None
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
        """The number of write directions per token the recurrence gets (1 for Gated DeltaNet)."""
        return {"none": 1, "prism": self.solver_steps, "split": 1 + self.solver_steps}[self.solver]

    @property
    def erase_strength_from_input(self) -> bool:
        """Whether in_proj makes the erase strength's logits b from x (Gated DeltaNet, split, and prism
        with solver_erase_strength input) rather than the solver from the anchor."""
        return self.solver != "prism" or self.solver_erase_strength == "input"

    @property
    def anchor_strengths(self) -> int:
        """The write strengths the solver makes from the anchor, one vector w_b and bias c_b each."""
        return {"none": 0, "prism": self.solver_steps - self.erase_strength_from_input,
                "split": self.solver_steps}[self.solver]

    @property
    def solver_init(self) -> SolverInit:
        """The solver's key normalisation and initial biases: the fields set, the rest its defaults."""
        default = SOLVER_INIT[self.solver]
        return SolverInit(
            key_norm=default.key_norm if self.solver_key_norm is None else self.solver_key_norm,
            gain_bias=default.gain_bias if self.solver_gain_bias is None else self.solver_gain_bias,
            strength_bias=default.strength_bias if self.solver_strength_bias is None else self.solver_strength_bias)

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
        if self.write_steps > MAX_WRITE_DIRECTIONS:
            raise ValueError(f"model.solver_steps={self.solver_steps} gives the {self.solver} solver {self.write_steps} "
                             f"write directions per token; the Triton kernel takes at most {MAX_WRITE_DIRECTIONS}")
        if self.solver_rank is not None and not 1 <= self.solver_rank < self.head_v_dim:
            raise ValueError(f"model.solver_rank must be in [1, head_v_dim={self.head_v_dim}) (unset: full maps), "
                             f"got {self.solver_rank}")
        for name in ("solver_rank", "solver_key_norm", "solver_gain_bias", "solver_strength_bias",
                     "solver_key_init_std"):
            if self.solver == "none" and getattr(self, name) is not None:
                raise ValueError(f"model.{name} does not apply to solver none (Gated DeltaNet has no solver)")
        for name in ("solver_first_residual", "solver_erase_strength", "solver_extra_strength_bias"):
            if self.solver != "prism" and getattr(self, name) is not None:
                raise ValueError(f"model.{name} applies to solver prism only, got solver {self.solver!r}")
        for name, values in (("solver_first_residual", FIRST_RESIDUALS), ("solver_erase_strength", ERASE_STRENGTHS)):
            if getattr(self, name) not in (None, *values):
                raise ValueError(f"model.{name} must be one of {values} (unset: {values[0]}), "
                                 f"got {getattr(self, name)!r}")
        if self.solver == "prism" and self.solver_steps == 1:
            for name in ("solver_extra_strength_bias", "solver_key_init_std"):
                if getattr(self, name) is not None:
                    raise ValueError(f"model.{name} needs solver_steps >= 2: prism at L = 1 has no extra "
                                     "writes or keys")
        if self.solver_key_init_std is not None and self.solver_key_init_std <= 0:
            raise ValueError(f"model.solver_key_init_std must be > 0, got {self.solver_key_init_std}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError(f"model.norm_eps and model.init_std must be > 0, got {self.norm_eps}, {self.init_std}")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    # Shard the activations between blocks along the sequence over the TP group.
    sequence_parallel: bool = False
    # Split each sample's tokens into this many contiguous slices, one per rank (context_parallel.py).
    context_parallel_size: int = 1
