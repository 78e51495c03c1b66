"""build_engine's bf16 update against AdamW in float64 (docs/QUALITY.md section 10): fed the
gradients the model itself computes, micro batch by micro batch, DeepSpeed's bf16 ZeRO-1 optimizer
must apply the update of our weight-decay groups, clipped by the global norm of the micro batches'
mean gradient, at lr_at's learning rates, and skip a step with a non-finite gradient (no update,
the schedule and Adam's step count held). Its float32 master weights are compared."""

import math

import pytest
import torch

from prism_megatron.config import ModelConfig
from prism_megatron.launch.config import OptimConfig, RunConfig, TrainingConfig
from prism_megatron.launch.engine import build_engine, lr_at
from prism_megatron.model import PrismLM

MICRO_BATCHES, STEPS, NONFINITE_STEP = 4, 6, 3
# The update of each parameter to this fraction of its largest element. float32 master weights and
# float32 Adam reach 1.3e-5 here; the accumulated gradient rounded to bf16 once, 1.5e-3 at the first
# step and more later. The learning rate is large so that the float32 rounding of O(1) weights (the
# norms' gains) stays far below their update.
UPDATE_RTOL = 5e-5
# The gradient norm: 2.5e-7 in float32, 2.4e-5 from the bf16 rounding at the first step.
NORM_RTOL = 1e-6


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return RunConfig(
        model=ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, head_k_dim=16, head_v_dim=16,
                          ffn_hidden_size=64, solver="prism", solver_steps=2, kernel_backend="torch",
                          tie_embeddings=True),
        # A clip far below the gradient norm (about 0.6), so that it binds at every step.
        optim=OptimConfig(lr=3e-2, min_lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=0.05),
        training=TrainingConfig(train_steps=STEPS, micro_batch_size=2, global_batch_size=2 * MICRO_BATCHES,
                                precision="bf16"))


class AdamW64:
    """torch.optim.AdamW's update in float64, from the model's parameters as they are now."""

    def __init__(self, params: dict[str, torch.Tensor], cfg: RunConfig):
        self.cfg = cfg
        self.weights = {name: p.detach().double().clone() for name, p in params.items()}
        # Spelled out here, not taken from weight_decay_groups: which parameters decay is under test.
        self.decays = {name: p.dim() >= 2 and not name.endswith("bias") for name, p in params.items()}
        self.m = {name: torch.zeros_like(w) for name, w in self.weights.items()}
        self.v = {name: torch.zeros_like(w) for name, w in self.weights.items()}
        self.steps = 0

    def step(self, grads: dict[str, torch.Tensor]) -> float:
        """One update from `grads` (the mean over the micro batches); the gradient norm before clipping."""
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


def test_bf16_update_is_adamw_of_the_mean_gradient(single_process, cfg):
    from deepspeed.utils import safe_get_full_fp32_param

    model = PrismLM(cfg.model, cfg.parallel)
    # Computes each micro batch's gradient from the engine's bf16 weights, outside the engine: the
    # same operations on the same values as the engine's backward, bit for bit.
    twin = PrismLM(cfg.model, cfg.parallel).to(torch.bfloat16)
    engine, optimizer = build_engine(cfg, model)
    params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
    reference = AdamW64(params, cfg)
    start = {name: w.clone() for name, w in reference.weights.items()}
    data = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        with torch.no_grad():
            for name, p in twin_params.items():
                p.copy_(params[name])
        grads = {name: torch.zeros_like(w) for name, w in start.items()}
        lr = optimizer.param_groups[0]["lr"]
        masters = {name: safe_get_full_fp32_param(p) for name, p in params.items()}
        skipped = engine.skipped_steps
        for micro in range(MICRO_BATCHES):
            tokens, labels = (torch.randint(0, cfg.model.vocab_size, (2, 32), generator=data) for _ in range(2))
            for name, g in zip(twin_params, torch.autograd.grad(twin(tokens, labels), list(twin_params.values()))):
                grads[name] += g.double() / MICRO_BATCHES
            loss = engine(tokens, labels)
            engine.backward(loss * math.nan if step == NONFINITE_STEP and micro == 1 else loss)
            engine.step()

        assert lr == pytest.approx(lr_at(reference.steps, cfg), rel=1e-12), step
        if step == NONFINITE_STEP:
            assert engine.skipped_steps == skipped + 1
            assert all(torch.equal(safe_get_full_fp32_param(p), masters[name]) for name, p in params.items())
            continue
        norm = reference.step(grads)
        assert float(engine.get_global_grad_norm()) == pytest.approx(norm, rel=NORM_RTOL), step
        for name, p in params.items():
            got = safe_get_full_fp32_param(p).double() - start[name]
            want = reference.weights[name] - start[name]
            deviation = float((got - want).abs().max() / want.abs().max())
            assert deviation < UPDATE_RTOL, (step, name, deviation)
