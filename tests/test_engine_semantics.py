"""build_engine's bf16 update against AdamW in float64 (benchmarks/optimizer_paths.py, docs/QUALITY.md
section 10): fed the gradients the model itself computes, micro batch by micro batch, DeepSpeed's bf16
ZeRO-1 optimizer must apply the update of our weight-decay groups, clipped by the global norm of the
micro batches' mean gradient, at lr_at's learning rates, with the mean in float32, and skip a step
with a non-finite gradient (no update, the schedule and Adam's step count held)."""
import sys
from pathlib import Path

import pytest

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
