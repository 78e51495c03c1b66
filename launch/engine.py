"""The DeepSpeed engine prism-train trains with, and the helpers around it that the benchmarks
share: the optimizer's parameter groups and learning-rate schedule, gradient accumulation, bf16,
one forward pass over a batch, a mean over the data-parallel ranks."""
from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist

from prism_megatron import quiet
from prism_megatron.launch.config import ConfigError, RunConfig, TrainingConfig


def build_engine(cfg: RunConfig, model: torch.nn.Module):
    """The DeepSpeed engine that trains `model` as `cfg` says, and the AdamW it wraps (whose
    param_groups hold the current learning rate); benchmarks time this engine. Call after
    initialize_parallel."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from prism_megatron.launch.flat_bf16 import use_flat_steps
    from prism_megatron.process_groups import data_size, deepspeed_mpu

    ds_logger.setLevel(logging.WARNING)
    t, o = cfg.training, cfg.optim
    # An optimizer instance, not DeepSpeed's "optimizer" config entry (which fails at initialize on
    # the GPU image, see shared/device/NOTES.md); fused on GPUs.
    optimizer = torch.optim.AdamW(weight_decay_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                  eps=o.eps, fused=torch.cuda.is_available())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / o.lr)
    with quiet.deepspeed_start():
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=deepspeed_mpu(),
            config={
                "train_batch_size": t.global_batch_size * cfg.parallel.context_parallel_size,
                "train_micro_batch_size_per_gpu": t.micro_batch_size,
                "gradient_accumulation_steps": grad_accumulation_steps(cfg, data_size()),
                "gradient_clipping": o.grad_clip,
                "zero_optimization": {"stage": t.zero_stage},
                # Skip updates from non-finite gradients in bf16 as ZeRO does in fp32. Each bf16 gradient
                # is added to its float32 accumulator as soon as it is ready and then freed, so the bf16
                # gradients of the whole model never exist at once.
                "bf16": {"enabled": use_bf16(t), "check_grad_overflow": True, "immediate_grad_update": True},
                # Gradients accumulate over micro batches in float32 (DeepSpeed's default for bf16 is
                # bf16). At ZeRO-1 this selects DeepSpeed's bf16 optimizer, which also checks for
                # non-finite gradients through the global norm alone, not with a pass over every gradient.
                "data_types": {"grad_accum_dtype": "fp32"},
                # That optimizer's accumulator is reduced over the data-parallel ranks once a step, cast
                # to the communication type first, which for bf16 runs is bf16 unless set: even on one
                # rank the accumulated gradient would reach the norm, the clip and Adam rounded to bf16
                # (docs/QUALITY.md section 10). ZeRO-2 and 3 reduce each micro batch's bf16 gradients
                # before accumulating them, and keep bf16 on the wire.
                **({"communication_data_type": "fp32"} if t.zero_stage == 1 else {}),
                # ZeRO wraps our AdamW instance.
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 1 << 62,
            })
    use_flat_steps(engine)
    return engine, optimizer


def use_bf16(training: TrainingConfig) -> bool:
    """bf16 as training.precision says: always, never, or (auto) where the device supports it."""
    return training.precision == "bf16" or (
        training.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def grad_accumulation_steps(cfg: RunConfig, dp_size: int) -> int:
    """Micro batches per optimizer step on each data-parallel rank."""
    t = cfg.training
    if t.global_batch_size % (t.micro_batch_size * dp_size):
        raise ConfigError(f"training.global_batch_size={t.global_batch_size} must be a multiple of "
                          f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp_size}")
    return t.global_batch_size // (t.micro_batch_size * dp_size)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weights and embeddings decay; biases, norms and other vectors do not.
    By name as well as by shape, since per-head parameters carry a head dimension: the solver's
    gain_bias [H, L, V] is a bias all the same."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or name.endswith("bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to optim.lr over warmup_steps, then a cosine down to optim.min_lr at train_steps."""
    o, total = cfg.optim, cfg.training.train_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def forward(engine, batch: dict) -> torch.Tensor:
    """The engine's mean loss over `batch` (tokens, labels and, if present, cu_seqlens)."""
    from prism_megatron.context_parallel import slice_batch

    batch = slice_batch(batch)  # this rank's part of each sample under context parallelism
    tokens, labels = batch["tokens"].to(engine.device), batch["labels"].to(engine.device)
    if "cu_seqlens" in batch:
        return engine(tokens, labels, cu_seqlens=batch["cu_seqlens"].to(engine.device))
    return engine(tokens, labels)


def dp_mean(value: torch.Tensor, mpu) -> float:
    """Mean of a scalar over the data-parallel ranks (the model-parallel ranks already agree)."""
    value = value.detach().to(torch.float64).clone()  # on the device: NCCL reduces no CPU tensors
    dist.all_reduce(value, group=mpu.get_data_parallel_group())
    return value.item() / mpu.get_data_parallel_world_size()
