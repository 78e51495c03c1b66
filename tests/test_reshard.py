"""Resume at another TP x DP layout: a TP=2 x DP=2 run (4 gloo ranks, fp32) saved at step 3 resumes
at TP=1 x DP=4, TP=4 x DP=1, TP=1 x DP=1 and TP=2 x DP=1 (ZeRO-1, then ZeRO-2) and its steps 4-6
match the uninterrupted run; the layout-free form holds exactly the optimizer state that was saved."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prism_megatron.launch.checkpoint.deepspeed_files import OPTIMIZER_TENSORS
from prism_megatron.launch.checkpoint.format import LAYOUT, LAYOUT_FREE, TENSORS
from prism_megatron.launch.checkpoint.safe_load import safe_load
from prism_megatron.sharding import ShardSpec
from test_train import STEPS, losses, prism_train, store, write_config  # noqa: F401 (store: a fixture)

# The resumed runs reduce in other orders (TP splits of the matmuls, DP sums): fp32 rounding only.
RTOL = 1e-5
LAYOUTS = [(1, 4), (4, 1), (1, 1), (2, 1)]


def run_config(folder: Path, store: str, tp: int, zero_stage: int) -> Path:
    path = write_config(folder, store, training={"zero_stage": zero_stage, "precision": "fp32", "micro_batch_size": 1})
    raw = yaml.safe_load(path.read_text())
    # 4 heads, so that each of 4 TP ranks owns a whole one.
    raw["model"].update(num_heads=4, head_k_dim=8, head_v_dim=8)
    raw["parallel"] = {"tensor_model_parallel_size": tp}
    path.write_text(yaml.safe_dump(raw))
    return path


def optimizer_partitions(step_dir: Path, mp: int, dp_size: int, kind: str) -> list[torch.Tensor]:
    """DeepSpeed's saved partitions of `kind` for TP rank `mp`, one flat tensor per param group.
    Its bf16 ZeRO-1 optimizer (files bf16_zero_pp_rank_*) saves the fp32 weights with the group's
    end padding, ZeRO's optimizer without; both save Adam's moments with it."""
    bf16 = (step_dir / f"bf16_zero_pp_rank_0_mp_rank_{mp:02d}_optim_states.pt").is_file()
    shards = [safe_load(step_dir / f"{'bf16_' * bf16}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt")
              ["optimizer_state_dict"] for dp in range(dp_size)]
    groups = []
    for g in range(len(shards[0]["group_paddings"])):
        if kind == "fp32":
            parts = [s["single_partition_of_fp32_groups"][g] for s in shards]
        else:
            parts = [s["base_optimizer_state"]["state"][g][kind] for s in shards]
        if kind != "fp32" or bf16:
            parts = [p[: p.numel() - s["group_paddings"][g]] for p, s in zip(parts, shards)]
        groups.append(torch.cat(parts))
    return groups


def check_layout_free_equals_saved(step_dir: Path, tp: int, dp: int) -> None:
    """Every element of the layout-free fp32 master, exp_avg and exp_avg_sq, split again for each
    TP rank and laid out in DeepSpeed's parameter order, equals the saved ZeRO partitions."""
    tensors = load_file(str(step_dir / LAYOUT_FREE / TENSORS))
    specs = {n: ShardSpec(s["partition_dim"], tuple(s["segments"]) if s["segments"] else None, s["vocab_size"])
             for n, s in json.loads((step_dir / LAYOUT).read_text())["params"].items()}
    for mp in range(tp):
        model_states = safe_load(step_dir / f"mp_rank_{mp:02d}_model_states.pt")
        for name, weight in model_states["module"].items():
            if name in specs:
                assert torch.equal(specs[name].shard(tensors[f"weight/{name}"], mp, tp), weight), name
                master = specs[name].shard(tensors[f"fp32/{name}"], mp, tp)
                # In an fp32 run the master weights are the module's, bit for bit; in bf16 they round to them.
                assert torch.equal(master.to(weight.dtype), weight), name
        for kind in OPTIMIZER_TENSORS:
            for g, saved in enumerate(optimizer_partitions(step_dir, mp, dp, kind)):
                names = list(model_states["param_shapes"][g])
                mine = torch.cat([specs[n].shard(tensors[f"{kind}/{n}"], mp, tp).flatten() for n in names])
                assert torch.equal(mine, saved), f"{kind}, group {g}, TP rank {mp}"


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_resume_at_other_layouts_continues_the_run(tmp_path, store, zero_stage):
    reference = tmp_path / "reference"
    prism_train("--config", run_config(reference, store, tp=2, zero_stage=zero_stage), nproc=4)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    saved = reference / "ckpt" / "step_00000003"

    for i, (tp, dp) in enumerate(LAYOUTS):
        resumed = tmp_path / f"tp{tp}_dp{dp}"
        # Its own checkpoint folder (holding only step 3) and its own, fresh, metrics folder.
        shutil.copytree(saved, resumed / "ckpt" / saved.name)
        result = prism_train("--config", run_config(resumed, store, tp=tp, zero_stage=zero_stage),
                             "--resume", nproc=tp * dp)
        out = result.stdout
        assert "written at TP=2 x DP=2" in out and f"this run is TP={tp} x DP={dp}" in out, out[-2000:]
        if i == 0:
            assert "converting it (once)" in out
            converted = resumed / "ckpt" / saved.name
            check_layout_free_equals_saved(converted, tp=2, dp=2)
            # Kept next to the checkpoint: the next resumes read it instead of converting again.
            saved = converted
        else:
            assert "loading its layout-free form" in out and "converting" not in out
        got = losses(resumed)
        # Only steps 4-6 in the fresh metrics folder: nothing before step 3 was redone or reinitialised.
        assert sorted(got) == [4, 5, 6], (tp, dp, got)
        assert got == pytest.approx({s: expected[s] for s in (4, 5, 6)}, rel=RTOL), (tp, dp)


def test_bf16_checkpoint_resumes_at_other_layouts(tmp_path, store):
    """bf16 runs take DeepSpeed's bf16 optimizer at ZeRO-1 (float32 gradient accumulation) and ZeRO's
    at ZeRO-2, which save in different formats: a TP=1 x DP=2 ZeRO-1 checkpoint converts exactly, and
    resumes at TP=2 x DP=1 (ZeRO-1) and at TP=1 x DP=1 (ZeRO-2) into the uninterrupted run's steps
    4-6 (to bf16 rounding: the resumed runs reduce in other orders, and round their sums to bf16)."""
    def config(folder: Path, tp: int, zero_stage: int) -> Path:
        path = run_config(folder, store, tp=tp, zero_stage=zero_stage)
        raw = yaml.safe_load(path.read_text())
        raw["training"]["precision"] = "bf16"
        path.write_text(yaml.safe_dump(raw))
        return path

    reference = tmp_path / "reference"
    prism_train("--config", config(reference, tp=1, zero_stage=1), nproc=2)
    expected = losses(reference)
    saved = reference / "ckpt" / "step_00000003"
    assert (saved / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    for tp, zero_stage in [(2, 1), (1, 2)]:
        resumed = tmp_path / f"tp{tp}_zero{zero_stage}"
        shutil.copytree(saved, resumed / "ckpt" / saved.name)
        out = prism_train("--config", config(resumed, tp=tp, zero_stage=zero_stage), "--resume", nproc=tp).stdout
        assert "written at TP=1 x DP=2" in out, out[-2000:]
        if tp == 2:
            check_layout_free_equals_saved(resumed / "ckpt" / saved.name, tp=1, dp=2)
        got = losses(resumed)
        assert sorted(got) == [4, 5, 6], got
        assert got == pytest.approx({s: expected[s] for s in (4, 5, 6)}, rel=1e-2), (tp, zero_stage)
