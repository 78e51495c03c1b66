"""The layout-free form of a checkpoint: its state with no layout, and loading it at any layout.

A ZeRO-1/2 checkpoint that resumes at another layout is first converted, once, into `layout_free/`:
per parameter name the global tensors (TP-unsharded, DP-unsharded) of the weight, the fp32 master
weight and both Adam moments in one safetensors file, plus the step, the samples consumed, the LR
schedule and Adam's step count in JSON. Every rank then takes its slice of each tensor (ShardSpec
for TP, DeepSpeed's `safe_set_full_*` for the ZeRO partition): the exact state, at any layout the
model shape allows. The conversion needs no process group.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from prism_megatron.files import write_atomic
from prism_megatron.launch.checkpoint.commit import TrainState
from prism_megatron.launch.checkpoint.deepspeed_files import global_state
from prism_megatron.launch.checkpoint.format import (LAYOUT_FREE, STATE, TENSORS, CheckpointError, file_record,
                                                     is_committed, remove, verify, write_complete)

log = logging.getLogger(__name__)


def layout_free_intact(path: Path) -> bool:
    folder = path / LAYOUT_FREE
    if not is_committed(folder):
        return False
    try:
        verify(folder)
        return True
    except CheckpointError as e:
        log.warning("the layout-free form %s is damaged (%s): converting again", folder, e)
        return False


def convert(path: Path) -> Path:
    """Write `path/layout_free/` (and commit it) from the checkpoint at `path`; return the folder."""
    from safetensors.torch import save_file

    tensors, rest = global_state(path)
    folder = path / LAYOUT_FREE
    if folder.exists():
        remove(folder)
    folder.mkdir()
    flat = {f"{kind}/{name}": t.contiguous() for kind, per_name in tensors.items() for name, t in per_name.items()}
    save_file(flat, str(folder / TENSORS))
    write_atomic(folder / STATE, json.dumps(rest, indent=1))
    write_complete(folder, rest["step"], {n: file_record(folder / n) for n in (TENSORS, STATE)})
    return folder


def global_weights(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Every parameter's global weight and the step: from the layout-free form if it is intact, else
    from DeepSpeed's files (without writing the layout-free form)."""
    if layout_free_intact(path):
        from safetensors.torch import load_file

        weights = {key.split("/", 1)[1]: t for key, t in load_file(str(path / LAYOUT_FREE / TENSORS)).items()
                   if key.startswith("weight/")}
        return weights, json.loads((path / LAYOUT_FREE / STATE).read_text())["step"]
    tensors, rest = global_state(path)
    return tensors["weight"], rest["step"]


def load_layout_free(engine, folder: Path) -> TrainState:
    """Give every parameter of `engine` (ZeRO-1/2) its slice of the global state in `folder`."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open

    from prism_megatron.process_groups import tp_rank, tp_size
    from prism_megatron.sharding import shard_spec

    record = json.loads((folder / STATE).read_text())
    params = dict(engine.module.named_parameters())
    names = {id(p): name for name, p in params.items()}
    # ZeRO's optimizer calls its parameter groups bit16_groups, the bf16 ZeRO-1 optimizer bf16_groups.
    bit16_groups = getattr(engine.optimizer, "bit16_groups", None) or engine.optimizer.bf16_groups
    groups = [[names[id(p)] for p in group] for group in bit16_groups]
    if groups != record["groups"]:
        raise CheckpointError(f"{folder} does not match this model's parameter groups: saved "
                              f"{record['groups']}, here {groups}")
    # Adam's state, as torch's AdamW creates it at its first step (which has not happened yet here);
    # then DeepSpeed links each parameter to its fragment of it, and the values are written through that.
    optimizer = engine.optimizer.optimizer  # our AdamW inside DeepSpeed's, one flat fp32 partition per group
    for group, lr in zip(optimizer.param_groups, record["lr_scheduler"]["_last_lr"]):
        group["lr"] = lr
        for flat in group["params"]:
            on_device = group.get("fused") or group.get("capturable")
            optimizer.state[flat] = {
                "step": torch.tensor(float(record["adam_step"]), dtype=torch.float32,
                                     device=flat.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    with safe_open(str(folder / TENSORS), framework="pt") as f, torch.no_grad():
        for name, p in params.items():
            spec = shard_spec(p)

            def local(kind: str) -> torch.Tensor:
                full = f.get_tensor(f"{kind}/{name}")
                expected = spec.global_shape(p.shape, tp_size())
                if tuple(full.shape) != expected:
                    raise CheckpointError(f"{folder}: {kind}/{name} has shape {list(full.shape)}, "
                                          f"the model needs {list(expected)}")
                try:
                    return spec.shard(full, tp_rank(), tp_size()).to(p.device)
                except ValueError as e:  # a TP size that does not divide this tensor's heads or width
                    raise CheckpointError(f"{folder}: {name} cannot be split over this run's {tp_size()} "
                                          f"tensor-parallel ranks: {e}") from None

            p.copy_(local("weight"))
            safe_set_full_fp32_param(p, local("fp32"))
            for kind in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, local(kind), kind)
    engine.lr_scheduler.load_state_dict(record["lr_scheduler"])
    engine.global_steps, engine.global_samples = record["step"], record["consumed_samples"]
    return TrainState(step=record["step"], consumed_samples=record["consumed_samples"])
