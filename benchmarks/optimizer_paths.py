"""The update DeepSpeed applies to a bf16 model at ZeRO-1, in each configuration this stack has
trained with, against AdamW in float64 fed the same gradients (issue 31; docs/QUALITY.md section 10).

    OMP_NUM_THREADS=1 python benchmarks/optimizer_paths.py [--micro-batches 4] [--lr 3e-3] [--steps 5]
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/optimizer_paths.py  # ZeRO-1 over 2 ranks

A tiny PrismLM (prism L=2, tied embeddings) trains on random tokens in bf16 under
launch.engine.build_engine, with gradient accumulation, a clip that binds and weight decay. Before
each step a twin of the model takes the engine's bf16 weights and computes each micro batch's gradient
outside the engine: the same operations on the same values, so bit for bit the engine's. The float64
references average them, round the mean as a configuration may (not at all; to bf16 once; to bf16
after each micro batch, as a bf16 accumulator does), clip it by its global norm and apply AdamW, with
the decay groups spelled out and lr_at's learning rates. Printed per step: how far the update of the
engine's float32 master weights is from each reference's, relative to the update's largest element,
the largest over the decaying and over the non-decaying parameters. A semantic difference (another
clip, decay group, learning rate or averaging) is of order 1 against every reference; a configuration
that only rounds matches one reference to float32 and the others at bf16's level.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from prism_megatron.config import ModelConfig
from prism_megatron.launch.config import OptimConfig, RunConfig, TrainingConfig
from prism_megatron.launch.engine import build_engine, grad_accumulation_steps, lr_at
from prism_megatron.model import PrismLM

MICRO_BATCH, SEQ_LENGTH = 2, 32


def _without(*keys: str) -> Callable[[dict], dict]:
    return lambda config: {k: v for k, v in config.items() if k not in keys}


# The DeepSpeed config of each path, from today's.
PATHS = {
    "today": lambda config: config,
    # e673f46 to 0c96af0: the float32 accumulator cast to bf16 for the all-reduce.
    "fp32-accumulated, reduced in bf16": _without("communication_data_type"),
    # Before e673f46: ZeRO's optimizer, gradients accumulated in bf16.
    "bf16-accumulated": _without("communication_data_type", "data_types"),
}


def _bf16_each(micro: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(micro[0])
    for g in micro:
        total += g
    return total.double()


# How a path may round the mean of the micro batches' bf16 gradients (each already divided by their number).
ROUNDINGS = {
    "exact": lambda micro: sum(g.double() for g in micro),
    "bf16 once": lambda micro: sum(g.double() for g in micro).to(torch.bfloat16).double(),
    "bf16 each": _bf16_each,
}


def tiny_config(micro_batches: int, lr: float, steps: int) -> RunConfig:
    """Training settings under which every part of the update shows: warmup and cosine within
    `steps`, decay, and a clip far below the gradient norm (about 0.6), so that it binds."""
    return RunConfig(
        model=ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, head_k_dim=16, head_v_dim=16,
                          ffn_hidden_size=64, solver="prism", solver_steps=2, kernel_backend="torch",
                          tie_embeddings=True),
        optim=OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=2, weight_decay=0.1, grad_clip=0.05),
        training=TrainingConfig(train_steps=steps, micro_batch_size=MICRO_BATCH,
                                global_batch_size=MICRO_BATCH * micro_batches, precision="bf16"))


class AdamW64:
    """torch.optim.AdamW's update in float64, from the model's parameters as they are now."""

    def __init__(self, params: dict[str, torch.Tensor], cfg: RunConfig):
        self.cfg = cfg
        self.weights = {name: p.detach().double().clone() for name, p in params.items()}
        # Spelled out, not taken from weight_decay_groups: which parameters decay is under test.
        self.decays = {name: p.dim() >= 2 and not name.endswith("bias") for name, p in params.items()}
        self.m = {name: torch.zeros_like(w) for name, w in self.weights.items()}
        self.v = {name: torch.zeros_like(w) for name, w in self.weights.items()}
        self.steps = 0

    def step(self, grads: dict[str, torch.Tensor]) -> float:
        """One update from `grads`; their global norm, before clipping."""
        o = self.cfg.optim
        lr, self.steps = lr_at(self.steps, self.cfg), self.steps + 1
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
        clip = min(1.0, o.grad_clip / (norm + 1e-6))  # DeepSpeed's epsilon
        (beta1, beta2), k = o.betas, self.steps
        for name, w in self.weights.items():
            g = grads[name] * clip
            w.mul_(1 - lr * o.weight_decay * self.decays[name])
            self.m[name].mul_(beta1).add_(g, alpha=1 - beta1)
            self.v[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            w.add_(-lr * self.m[name] / (1 - beta1 ** k) / ((self.v[name] / (1 - beta2 ** k)).sqrt() + o.eps))
        return norm


@dataclass
class StepRecord:
    lr: float  # the engine's, for this step
    expected_lr: float  # lr_at of the steps applied before it
    skipped: bool
    grad_norm: float  # the engine's
    reference_norms: dict[str, float] = field(default_factory=dict)  # per rounding, unless skipped
    # Per rounding and parameter: max |engine's update - reference's| / max |reference's update|, the
    # updates since the start.
    deviations: dict[str, dict[str, float]] = field(default_factory=dict)


class Comparison:
    """An engine built by build_engine (its DeepSpeed config edited by `path`) and one float64 AdamW per
    rounding, stepped on the same random micro batches. Call after initialize_parallel."""

    def __init__(self, cfg: RunConfig, roundings: tuple[str, ...], path: Callable[[dict], dict] = PATHS["today"]):
        import deepspeed

        from prism_megatron.process_groups import data_size

        self.cfg = cfg
        # Every data-parallel rank draws the same micro batches, so their mean over the ranks is this rank's.
        self.micro_batches = grad_accumulation_steps(cfg, data_size())
        model = PrismLM(cfg.model, cfg.parallel)
        self.twin = PrismLM(cfg.model, cfg.parallel).to(torch.bfloat16)
        initialize = deepspeed.initialize
        try:
            deepspeed.initialize = lambda config, **kw: initialize(config=path(config), **kw)
            self.engine, self.optimizer = build_engine(cfg, model)
        finally:
            deepspeed.initialize = initialize
        self.params = dict(model.named_parameters())
        self.twin_params = dict(self.twin.named_parameters())
        self.references = {r: AdamW64(self.params, cfg) for r in roundings}
        self.start = {name: p.detach().double().clone() for name, p in self.params.items()}
        self.data = torch.Generator().manual_seed(1)

    def step(self, nonfinite: bool = False) -> StepRecord:
        """One optimizer step of the engine over its micro batches, and of each reference unless the
        engine skipped it. `nonfinite`: the second micro batch's loss is NaN."""
        from deepspeed.utils import safe_get_full_fp32_param

        with torch.no_grad():
            for name, p in self.twin_params.items():
                p.copy_(self.params[name])
        micro_grads = {name: [] for name in self.params}
        lr, skipped = self.optimizer.param_groups[0]["lr"], self.engine.skipped_steps
        for micro in range(self.micro_batches):
            tokens, labels = (torch.randint(0, self.cfg.model.vocab_size, (MICRO_BATCH, SEQ_LENGTH),
                                            generator=self.data) for _ in range(2))
            twin_loss = self.twin(tokens, labels) / self.micro_batches  # as the engine scales it
            for name, g in zip(self.twin_params, torch.autograd.grad(twin_loss, list(self.twin_params.values()))):
                micro_grads[name].append(g)
            loss = self.engine(tokens, labels)
            self.engine.backward(loss * math.nan if nonfinite and micro == 1 else loss)
            self.engine.step()
        reference = next(iter(self.references.values()))
        record = StepRecord(lr=lr, expected_lr=lr_at(reference.steps, self.cfg),
                            skipped=self.engine.skipped_steps > skipped,
                            grad_norm=float(self.engine.get_global_grad_norm()))
        masters = {name: safe_get_full_fp32_param(p).double() - self.start[name] for name, p in self.params.items()}
        for rounding, reference in self.references.items():
            if not record.skipped:
                record.reference_norms[rounding] = reference.step(
                    {name: ROUNDINGS[rounding](g) for name, g in micro_grads.items()})
            record.deviations[rounding] = {}
            for name, got in masters.items():
                want = reference.weights[name] - self.start[name]
                record.deviations[rounding][name] = float((got - want).abs().max() / want.abs().max())
        return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", type=int, default=4, help="a step's, over all data-parallel ranks")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    from prism_megatron.process_groups import data_size, destroy_parallel, initialize_parallel

    cfg = tiny_config(args.micro_batches, args.lr, args.steps)
    initialize_parallel(cfg.parallel, seed=0)
    say = (lambda line: print(line, flush=True)) if torch.distributed.get_rank() == 0 else (lambda line: None)
    try:
        for name, path in PATHS.items():
            comparison = Comparison(cfg, tuple(ROUNDINGS), path)
            say(f"{name} ({type(comparison.engine.optimizer).__name__}), {comparison.micro_batches} micro batches "
                f"on each of {data_size()} data-parallel ranks, "
                  f"lr {args.lr:g}: the update's deviation from each reference, decaying / non-decaying parameters")
            for step in range(1, args.steps + 1):
                record = comparison.step()
                line = f"  step {step}: lr {record.lr:.4g} (lr_at {record.expected_lr:.4g}), grad norm {record.grad_norm:.6g}"
                for rounding, deviations in record.deviations.items():
                    decay = comparison.references[rounding].decays
                    worst = [max(d for n, d in deviations.items() if decay[n] == decays) for decays in (True, False)]
                    line += (f" | {rounding} (norm {record.reference_norms[rounding]:.6g}): "
                             f"{worst[0]:.1e} / {worst[1]:.1e}")
                say(line)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
