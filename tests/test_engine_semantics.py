"""build_engine's bf16 update against AdamW in float64 (benchmarks/optimizer_paths.py, docs/QUALITY.md
section 10): fed the gradients the model itself computes, micro batch by micro batch, DeepSpeed's bf16
ZeRO-1 optimizer must apply the update of our weight-decay groups, clipped by the global norm of the
micro batches' mean gradient, at lr_at's learning rates, with the mean in float32, and skip a step
with a non-finite gradient (no update, the schedule and Adam's step count held)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from optimizer_paths import Comparison, tiny_config  # noqa: E402

STEPS, NONFINITE_STEP = 6, 3
# The update of each parameter, relative to its largest element. Float32 master weights and float32
# Adam reach 1.3e-5 here; the mean gradient rounded to bf16 once, 8e-4 at the first step and 2e-3
# later. The learning rate is large so that the float32 rounding of O(1) weights (the norms' gains)
# stays far below their update.
UPDATE_RTOL = 5e-5
# The gradient norm: 2.5e-7 in float32; 2.4e-5 with the mean rounded to bf16, at the first step.
NORM_RTOL = 1e-6


def test_bf16_update_is_adamw_of_the_mean_gradient(single_process):
    comparison = Comparison(tiny_config(micro_batches=4, lr=3e-2, steps=STEPS), roundings=("exact",))
    for step in range(STEPS):
        record = comparison.step(nonfinite=step == NONFINITE_STEP)
        assert record.lr == pytest.approx(record.expected_lr, rel=1e-12), step
        assert record.skipped == (step == NONFINITE_STEP), step
        if not record.skipped:
            assert record.grad_norm == pytest.approx(record.reference_norms["exact"], rel=NORM_RTOL), step
        worst = max(record.deviations["exact"].items(), key=lambda item: item[1])
        assert worst[1] < UPDATE_RTOL, (step, worst)


def _train_with_each_optimizer(tp: int, steps: int = 4, nonfinite_step: int = 2) -> None:
    """The same model trained by build_engine's FlatBF16Optimizer and by DeepSpeed's BF16_Optimizer it
    replaces: with a clip that binds, gradient accumulation, a non-finite micro batch and, over two
    processes, the all-reduce (data parallel) or the norm's sum over ranks (tensor parallel), the
    grad norms, the skipped steps and the float32 master weights are bitwise alike."""
    import math
    from dataclasses import replace

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.utils import safe_get_full_fp32_param

    from prism_megatron.config import ParallelConfig
    from prism_megatron.launch.engine import build_engine, grad_accumulation_steps
    from prism_megatron.launch.flat_bf16 import FlatBF16Optimizer
    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import data_rank, data_size, destroy_parallel, initialize_parallel
    from optimizer_paths import MICRO_BATCH, SEQ_LENGTH

    cfg = tiny_config(micro_batches=4, lr=3e-2, steps=steps)
    cfg = replace(cfg, parallel=ParallelConfig(tensor_model_parallel_size=tp))
    initialize_parallel(cfg.parallel, seed=0)
    try:
        runs = []
        for flat in (True, False):
            model = PrismLM(cfg.model, cfg.parallel, seed=0)
            engine, _ = build_engine(cfg, model)
            assert type(engine.optimizer) is FlatBF16Optimizer
            if not flat:
                engine.optimizer.__class__ = BF16_Optimizer
            data = torch.Generator().manual_seed(1 + data_rank())
            norms = []
            for step in range(steps):
                for micro in range(grad_accumulation_steps(cfg, data_size())):
                    tokens, labels = (torch.randint(0, cfg.model.vocab_size, (MICRO_BATCH, SEQ_LENGTH), generator=data)
                                      for _ in range(2))
                    loss = engine(tokens, labels)
                    engine.backward(loss * math.nan if step == nonfinite_step and micro == 0 else loss)
                    engine.step()
                norms.append(float(engine.get_global_grad_norm()))
            masters = [safe_get_full_fp32_param(p) for p in model.parameters()]
            runs.append((norms, engine.skipped_steps, masters))
        (norms, skipped, masters), (want_norms, want_skipped, want_masters) = runs
        assert norms == want_norms and skipped == want_skipped == 1, (norms, want_norms, skipped)
        assert all(torch.equal(got, want) for got, want in zip(masters, want_masters))
    finally:
        destroy_parallel()


@pytest.mark.parametrize("world, tp", [(1, 1), (2, 1), (2, 2)], ids=["one rank", "DP=2", "TP=2"])
def test_flat_steps_train_as_deepspeeds_bf16_optimizer(world, tp):
    from test_tensor_parallel import run_distributed

    run_distributed(world, _train_with_each_optimizer, tp)
