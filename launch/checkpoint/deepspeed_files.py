"""DeepSpeed's ZeRO-1/2 checkpoint files (their names and contents are DeepSpeed's), read as global
tensors: each parameter's TP shards joined and its ZeRO partitions unpadded and concatenated. Offline:
no process group, no GPU.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from prism_megatron.launch.checkpoint.format import CheckpointError, read_layout, read_shard_specs
from prism_megatron.launch.checkpoint.safe_load import safe_load

# The optimizer tensors kept per parameter, besides its weight: DeepSpeed's names for them.
OPTIMIZER_TENSORS = ("fp32", "exp_avg", "exp_avg_sq")


def global_state(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a ZeRO-1/2 checkpoint written at any layout: {kind: {name: global tensor}} for the kinds
    weight, fp32, exp_avg, exp_avg_sq, and the rest of the state (step, samples, scheduler, Adam step)."""
    layout = read_layout(path)
    if layout.zero_stage not in (1, 2):
        raise CheckpointError(f"checkpoint {path} was written with ZeRO-{layout.zero_stage}: only ZeRO-1 and "
                              "ZeRO-2 checkpoints convert to the layout-free form")
    specs = read_shard_specs(path)
    local: dict[str, dict[str, list[torch.Tensor]]] = {k: {} for k in ("weight", *OPTIMIZER_TENSORS)}
    adam_steps = set()
    model_states: dict = {}
    for mp in range(layout.tensor_parallel):
        model_states = safe_load(path / f"mp_rank_{mp:02d}_model_states.pt", "cpu")
        for name, tensor in model_states["module"].items():
            if name in specs:
                local["weight"].setdefault(name, []).append(tensor)
        shards = [safe_load(_optimizer_file(path, dp, mp), "cpu")["optimizer_state_dict"]
                  for dp in range(layout.data_parallel)]
        # ZeRO's optimizer (fp32 runs, and ZeRO-2) saves the fp32 weights without the group's end padding
        # and lists a padding per parameter; DeepSpeed's bf16 ZeRO-1 optimizer packs the parameters back
        # to back and saves every partition whole, end padding included.
        bf16_format = "param_alignment_paddings" not in shards[0]

        def unpadded(shard: dict, tensor: torch.Tensor, g: int) -> torch.Tensor:
            return tensor[: tensor.numel() - shard["group_paddings"][g]]

        for g, shapes in enumerate(model_states["param_shapes"]):
            flat = {"fp32": torch.cat([unpadded(s, s["single_partition_of_fp32_groups"][g], g) if bf16_format
                                       else s["single_partition_of_fp32_groups"][g] for s in shards])}
            for kind in ("exp_avg", "exp_avg_sq"):
                flat[kind] = torch.cat([unpadded(s, s["base_optimizer_state"]["state"][g][kind], g) for s in shards])
            adam_steps |= {float(s["base_optimizer_state"]["state"][g]["step"]) for s in shards}
            paddings = [0] * len(shapes) if bf16_format else shards[0]["param_alignment_paddings"][g]
            offset = 0
            for (name, shape), padding in zip(shapes.items(), paddings):
                numel = torch.Size(shape).numel()
                for kind in OPTIMIZER_TENSORS:
                    local[kind].setdefault(name, []).append(flat[kind].narrow(0, offset, numel).view(shape).clone())
                offset += numel + padding
            if offset - (paddings[-1] if paddings else 0) != flat["fp32"].numel():
                raise CheckpointError(f"checkpoint {path}: the optimizer partitions of group {g} hold "
                                      f"{flat['fp32'].numel()} values, the parameters {offset}")
    if len(adam_steps) != 1:
        raise CheckpointError(f"checkpoint {path}: the optimizer partitions disagree on Adam's step {sorted(adam_steps)}")
    tensors = {kind: {name: specs[name].unshard(parts) for name, parts in per_name.items()}
               for kind, per_name in local.items()}
    for kind, per_name in tensors.items():
        if per_name.keys() != specs.keys():
            raise CheckpointError(f"checkpoint {path}: {kind} tensors missing for {sorted(specs.keys() - per_name.keys())}")
    rest = {"step": model_states["step"], "consumed_samples": model_states["consumed_samples"],
            "lr_scheduler": model_states["lr_scheduler"], "adam_step": adam_steps.pop(),
            "source_layout": asdict(layout), "groups": [list(shapes) for shapes in model_states["param_shapes"]]}
    return tensors, rest


def _optimizer_file(path: Path, dp: int, mp: int) -> Path:
    # DeepSpeed prefixes the name with "bf16_" in bf16 runs.
    name = f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
    found = [f for f in (path / f"bf16_{name}", path / name) if f.is_file()]
    if not found:
        raise CheckpointError(f"checkpoint {path} is incomplete: {path / name} is missing")
    return found[0]
