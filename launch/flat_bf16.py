"""DeepSpeed's bf16 ZeRO-1 optimizer with its step's gradient passes over its flat float32 buffers.

DeepSpeed's BF16_Optimizer keeps every parameter's float32 gradient as a view into one flat buffer
per parameter group, yet its step walks the parameters one at a time: a norm kernel per gradient for
the global norm, a multiply per gradient to clip, and, in the engine's reduction, a copy of each flat
buffer into a bucket and back (on one data-parallel rank too, where the all-reduce does nothing).
At the 1.3B preset that is a few hundred kernel launches and two copies of the model's float32
gradients every step, and a float32 copy of each bf16 gradient every micro batch.
`FlatBF16Optimizer` keeps DeepSpeed's state, checkpoint format and arithmetic and does the same work
over the flat buffers: the all-reduce in place, the clip as one multiply a buffer, the norms as one
multi-tensor kernel, each accumulation as one mixed-precision addition.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.utils import is_invalid_grad_norm, is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank


def use_flat_steps(engine) -> None:
    """Make `engine`'s optimizer a FlatBF16Optimizer if it is DeepSpeed's bf16 optimizer (bf16 at
    ZeRO-1); other optimizers are left as they are."""
    if type(engine.optimizer) is BF16_Optimizer and engine.optimizer.grad_acc_dtype is torch.float32:
        # Its state stays as DeepSpeed built it; only the methods below change.
        engine.optimizer.__class__ = FlatBF16Optimizer


class FlatBF16Optimizer(BF16_Optimizer):
    """BF16_Optimizer (without pipeline parallelism, MoE or Muon, which this stack does not use) whose
    reduction, norm and clip run over its flat float32 gradient buffers."""

    @torch.no_grad()
    def _update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads):
        """Add a parameter's bf16 gradient to its float32 accumulator in one kernel (DeepSpeed's casts
        it to a float32 copy first, then adds the copy): the same sum, widened inside the addition."""
        if lp.grad is None:
            return
        hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
        hp_grad.add_(lp.grad.view(hp_grad.shape))
        lp._hp_grad = hp_grad
        self.fp32_groups_has_gradients[group_idx][param_idx] = True
        if clear_lp_grads:
            lp.grad.zero_()

    @torch.no_grad()
    def reduce_gradients(self, pipeline_parallel: bool = False) -> None:
        """The mean of each gradient buffer over the data-parallel ranks, in place: the engine's
        fallback flattens the buffers into a bucket (a copy), all-reduces it, divides it and copies it
        back, and the engine calls this instead where the optimizer has it."""
        for flat, group in zip(self.fp32_groups_gradients_flat, self.real_dp_process_group):
            size = dist.get_world_size(group=group)
            if size > 1:
                dist.all_reduce(flat, group=group)
                flat.mul_(1.0 / size)

    def _gradients_for_norm(self) -> list[torch.Tensor]:
        """The gradients the global norm counts, as BF16_Optimizer.get_grads_for_norm chooses them: a
        parameter every tensor-parallel rank holds whole is counted on rank 0 only. Views into the flat
        buffers, which live as long as the optimizer: chosen once."""
        if not hasattr(self, "_norm_gradients"):
            first_rank = bwc_tensor_model_parallel_rank(mpu=self.mpu) == 0
            self._norm_gradients = [
                grad for params, grads in zip(self.bf16_groups, self.fp32_groups_gradients)
                for param, grad in zip(params, grads) if first_rank or is_model_parallel_parameter(param)]
        return self._norm_gradients

    @torch.no_grad()
    def global_norm(self) -> torch.Tensor:
        """The 2-norm of the model's gradient, as DeepSpeed's get_global_norm_of_tensors computes it
        (each tensor's norm, then the root of the sum of their squares over the model-parallel ranks),
        non-finite values marked as DeepSpeed marks them."""
        norms = torch._foreach_norm(self._gradients_for_norm(), 2.0)
        total = torch.stack(norms).pow(2.0).sum()
        if self.mpu is not None:
            dist.all_reduce(total, group=self.mpu.get_model_parallel_group())
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=total.device)
        return total

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise NotImplementedError(f"{type(self).__name__} does not support closure")
        self.overflow = False
        norm = self._global_grad_norm = self.global_norm()
        if is_invalid_grad_norm(norm):  # a non-finite gradient: no update, as DeepSpeed's step does
            self.overflow = True
            self._global_grad_norm = float("inf")
            self.clear_hp_grads()
            self.clear_lp_grads()
            return
        if self.clip_grad > 0.0:
            # DeepSpeed's coefficient, applied without asking the device whether it binds: a
            # multiplication by 1.0 changes nothing.
            coefficient = (self.clip_grad / (norm + 1e-6)).clamp(max=1.0)
            for flat in self.fp32_groups_gradients_flat:
                flat.mul_(coefficient)
        for param, grad in zip(self.fp32_groups_flat_partition, self.fp32_groups_gradient_flat_partition):
            param.grad = grad
        self.optimizer.step()
        self._lazy_init_hp_params_optimizer_state()
        self.update_lp_params()
        self.clear_hp_grads()
