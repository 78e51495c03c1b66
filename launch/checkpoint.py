"""Checkpoints: DeepSpeed's files plus what DeepSpeed leaves out, committed only once complete,
opened without running code, and resumable at any tensor x data-parallel layout.

    DIR/step_00000100/               DeepSpeed's model/optimizer/scheduler files, layout.json,
                                     run_config.json, COMPLETE
    DIR/step_00000100/layout_free/   the same state with no layout (made on demand, see below)
    DIR/latest                       tag of the newest committed checkpoint (what DeepSpeed's tools read)

Commit. DeepSpeed writes its own `latest` before the final barrier of `save_checkpoint`, so a crash
can leave it pointing at a half-written folder. Here every rank saves, all ranks meet at a barrier,
the ranks hash the files between them, and only then rank 0 writes COMPLETE (every file's size and
sha256) and `latest`, each atomically. A folder without COMPLETE is not a checkpoint; one whose
files do not match their record is skipped on resume in favour of the newest intact one.

Safe loading. Every file is opened with `torch.load(weights_only=True)` (DeepSpeed's engine gets
`safe_checkpoint_engine()`), allowing only three of DeepSpeed's own plain record classes; the RNG states
travel as tensors and lists of ints. A file holding any other object is refused, never executed.

Layouts. `layout.json` records the TP and DP sizes, the ZeRO stage and every parameter's TP split
(`parallel.ShardSpec`). At the layout that wrote it a checkpoint loads through DeepSpeed, bitwise.
At another layout (ZeRO-1/2) it is first converted, once, into `layout_free/`: per parameter name
the global tensors (TP-unsharded, DP-unsharded) of the weight, the fp32 master weight and both Adam
moments in one safetensors file, plus the step, the samples consumed, the LR schedule and Adam's
step count in JSON. Every rank then takes its slice of each tensor (ShardSpec for TP, DeepSpeed's
`safe_set_full_*` for the ZeRO partition): the exact state, at any layout the model shape allows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from prism_megatron.files import write_atomic

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
LAYOUT = "layout.json"
RUN_CONFIG = "run_config.json"
LAYOUT_FREE = "layout_free"
TENSORS = "state.safetensors"
STATE = "state.json"
# The optimizer tensors kept per parameter, besides its weight: DeepSpeed's names for them.
OPTIMIZER_TENSORS = ("fp32", "exp_avg", "exp_avg_sq")
_TAG = re.compile(r"step_(\d+)")
_HASH_BLOCK = 1 << 24


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    data_parallel: int
    zero_stage: int

    def __str__(self) -> str:
        return f"TP={self.tensor_parallel} x DP={self.data_parallel}, ZeRO-{self.zero_stage}"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------
# Saving and committing


def save(engine, ckpt_dir: str | Path, state: TrainState, run_config: dict, keep_last: int) -> Path:
    """Save on every rank, then commit on rank 0 after all ranks have finished writing."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(state.step)
    path = ckpt_dir / tag
    if dist.get_rank() == 0 and path.exists():
        # Left by a run that crashed while saving this step (or skipped as damaged): start from an
        # empty folder so no stale file of another layout ends up inside a committed checkpoint.
        _remove(path)
    dist.barrier()
    engine.checkpoint_engine = safe_checkpoint_engine()
    client_state = {"step": state.step, "consumed_samples": state.consumed_samples, "rng": _gather_rng_states()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    layout = current_layout(engine)
    if dist.get_rank() == 0:
        write_atomic(path / RUN_CONFIG, json.dumps(run_config, indent=2))
        write_atomic(path / LAYOUT, json.dumps({**asdict(layout), "params": _param_specs(engine.module)}, indent=1))
    dist.barrier()
    files = sorted(str(f.relative_to(path)) for f in path.iterdir() if f.is_file())
    mine = {name: _file_record(path / name) for name in files[dist.get_rank()::dist.get_world_size()]}
    records: list = [None] * dist.get_world_size()
    dist.all_gather_object(records, mine)
    if dist.get_rank() == 0:
        _commit(path, {"step": state.step, "files": {k: v for r in records for k, v in sorted(r.items())}})
        write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return path


def current_layout(engine) -> Layout:
    from prism_megatron.process_groups import tp_size

    return Layout(tp_size(), dist.get_world_size() // tp_size(), int(engine.zero_optimization_stage()))


def _param_specs(model: torch.nn.Module) -> dict:
    from prism_megatron.sharding import shard_spec

    return {name: asdict(shard_spec(p)) for name, p in model.named_parameters()}


def _file_record(f: Path) -> dict:
    digest = hashlib.sha256()
    with open(f, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return {"bytes": f.stat().st_size, "sha256": digest.hexdigest()}


def _commit(folder: Path, record: dict) -> None:
    write_atomic(folder / COMPLETE, json.dumps(record, indent=1))


def _remove(folder: Path) -> None:
    # Uncommit first: a crash during rmtree must not leave a "complete" checkpoint with holes.
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Called only after the newest checkpoint is committed, so the ones removed are never the last.
    Folders of saves that never finished, older than the newest checkpoint, go too (nothing reads them)."""
    found = step_folders(ckpt_dir)
    for path in found[:-1]:
        if not (path / COMPLETE).is_file():
            shutil.rmtree(path)
    if keep_last:
        for old in committed(ckpt_dir)[:-keep_last]:
            _remove(old)


# ----------------------------------------------------------------------------------------------
# Finding and checking


def committed(ckpt_dir: str | Path) -> list[Path]:
    """Committed checkpoints in `ckpt_dir`, oldest first."""
    return [p for p in step_folders(ckpt_dir) if (p / COMPLETE).is_file()]


def step_folders(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _TAG.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def newest(ckpt_dir: str | Path) -> Path | None:
    """The newest intact checkpoint. Newer ones that are half-written, truncated or corrupt are
    skipped with a warning naming the file; None if there is no checkpoint, an error if none is intact."""
    folders = step_folders(ckpt_dir)
    problems = []
    for path in reversed(folders):
        if not (path / COMPLETE).is_file():
            problems.append(f"{path} has no {COMPLETE} marker (a save that did not finish)")
            log.warning("skipping %s", problems[-1])
            continue
        try:
            verify(path)
            return path
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("skipping %s", e)
    if any((p / COMPLETE).is_file() for p in folders):
        raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(problems))
    return None


def verify(path: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, not the size or not the hash
    recorded, or saying that the checkpoint vanished or changed while it was read."""
    try:
        marker = (path / COMPLETE).read_text()
        files = json.loads(marker)["files"]
        records = {name: (int(r["bytes"]), str(r["sha256"])) for name, r in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(vanished(path) or f"checkpoint {path}: unreadable {COMPLETE} marker ({e})") from None
    for name, (size, sha256) in records.items():
        f = path / name
        try:
            problem = _file_problem(f, size, sha256)
        except FileNotFoundError:
            problem = f"is incomplete: {f} is missing"
        if problem:
            raise CheckpointError(vanished(path, marker) or f"checkpoint {path} {problem}")


def _file_problem(f: Path, size: int, sha256: str) -> str | None:
    if not f.is_file():
        return f"is incomplete: {f} is missing"
    if f.stat().st_size != size:
        return f"is corrupt: {f} has {f.stat().st_size} bytes, {size} were written"
    if _file_record(f)["sha256"] != sha256:
        return f"is corrupt: {f} does not match its recorded sha256 (its contents changed after it was written)"
    return None


def vanished(path: Path, marker: str | None = None) -> str | None:
    """Why a checkpoint being read is no longer the one the reader started on, or None: its folder
    or COMPLETE marker is gone, or the marker no longer reads `marker` (another run pruning or
    rewriting the folder, most likely)."""
    try:
        now = (path / COMPLETE).read_text()
    except OSError:
        now = None
    if now is not None and (marker is None or now == marker):
        return None
    return (f"checkpoint {path} vanished or changed while being read: another run may be writing "
            f"{path.parent}")


def read_layout(path: Path) -> Layout:
    try:
        record = json.loads((path / LAYOUT).read_text())
        return Layout(record["tensor_parallel"], record["data_parallel"], record["zero_stage"])
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(vanished(path) or f"checkpoint {path}: no readable {LAYOUT} ({e}); it was written "
                              "before checkpoints recorded their layout and resumes only at the layout that "
                              "wrote it") from None


# ----------------------------------------------------------------------------------------------
# Safe loading


def _allowed_classes() -> list:
    # DeepSpeed's plain records inside its optimizer files: restored as data, none runs code.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """torch.load that runs no code from the file: tensors, plain data and DeepSpeed's records only."""
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, refused "
                              f"(loading it could run code): {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise CheckpointError(f"{path} cannot be loaded: {type(e).__name__}: {e}") from None


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading through `safe_load` (built here, not at import,
    so that importing this module does not import DeepSpeed before its accelerator is chosen)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return SafeCheckpointEngine(None)


# ----------------------------------------------------------------------------------------------
# Loading into a training engine


def load(engine, path: Path) -> TrainState:
    """Restore model, optimizer, scheduler and position; at another layout through `layout_free/`."""
    saved, here = read_layout(path), current_layout(engine)
    if saved == here:
        return _load_same_layout(engine, path)
    if 3 in (saved.zero_stage, here.zero_stage):
        raise CheckpointError(f"checkpoint {path} was written at {saved}; this run is {here}: ZeRO-3 "
                              "checkpoints resume only at the layout that wrote them (and ZeRO-3 runs only "
                              "from a checkpoint of their own layout)")
    folder = path / LAYOUT_FREE
    if dist.get_rank() == 0:
        if layout_free_intact(path):
            log.info("checkpoint %s was written at %s; this run is %s: loading its layout-free form %s",
                     path, saved, here, folder)
        else:
            log.info("checkpoint %s was written at %s; this run is %s: converting it (once) to %s",
                     path, saved, here, folder)
            convert(path)
    dist.barrier()
    if dist.get_rank() != 0:
        verify(folder)
    return load_layout_free(engine, folder)


def _load_same_layout(engine, path: Path) -> TrainState:
    engine.checkpoint_engine = safe_checkpoint_engine()
    try:
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    except CheckpointError:
        raise
    except Exception as e:  # DeepSpeed raises many types for a damaged file
        raise CheckpointError(vanished(path) or f"checkpoint {path} cannot be loaded: {type(e).__name__}: {e}") from e
    if load_path is None or client_state is None or "consumed_samples" not in client_state:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: DeepSpeed found no usable state in it")
    _set_rng_state(client_state["rng"][dist.get_rank()])
    return TrainState(step=client_state["step"], consumed_samples=client_state["consumed_samples"])


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


# ----------------------------------------------------------------------------------------------
# The layout-free form (offline: reads DeepSpeed's ZeRO-1/2 files, needs no process group)


def layout_free_intact(path: Path) -> bool:
    folder = path / LAYOUT_FREE
    if not (folder / COMPLETE).is_file():
        return False
    try:
        verify(folder)
        return True
    except CheckpointError as e:
        log.warning("the layout-free form %s is damaged (%s): converting again", folder, e)
        return False


def global_state(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a ZeRO-1/2 checkpoint written at any layout: {kind: {name: global tensor}} for the kinds
    weight, fp32, exp_avg, exp_avg_sq, and the rest of the state (step, samples, scheduler, Adam step)."""
    from prism_megatron.sharding import ShardSpec

    layout = read_layout(path)
    if layout.zero_stage not in (1, 2):
        raise CheckpointError(f"checkpoint {path} was written with ZeRO-{layout.zero_stage}: only ZeRO-1 and "
                              "ZeRO-2 checkpoints convert to the layout-free form")
    specs = {name: ShardSpec(s["partition_dim"], tuple(s["segments"]) if s["segments"] else None, s["vocab_size"])
             for name, s in json.loads((path / LAYOUT).read_text())["params"].items()}
    local: dict[str, dict[str, list[torch.Tensor]]] = {k: {} for k in ("weight", *OPTIMIZER_TENSORS)}
    adam_steps = set()
    model_states: dict = {}
    for mp in range(layout.tensor_parallel):
        model_file = path / f"mp_rank_{mp:02d}_model_states.pt"
        model_states = safe_load(model_file, "cpu")
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


def convert(path: Path) -> Path:
    """Write `path/layout_free/` (and commit it) from the checkpoint at `path`; return the folder."""
    from safetensors.torch import save_file

    tensors, rest = global_state(path)
    folder = path / LAYOUT_FREE
    if folder.exists():
        _remove(folder)
    folder.mkdir()
    flat = {f"{kind}/{name}": t.contiguous() for kind, per_name in tensors.items() for name, t in per_name.items()}
    save_file(flat, str(folder / TENSORS))
    write_atomic(folder / STATE, json.dumps(rest, indent=1))
    _commit(folder, {"step": rest["step"], "files": {n: _file_record(folder / n) for n in (TENSORS, STATE)}})
    return folder


# ----------------------------------------------------------------------------------------------
# Export: the model alone, for use anywhere (no DeepSpeed, any TP size)

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


def export(path: Path, out: Path) -> Path:
    """Write `out/model.safetensors` (every parameter's global tensor) and `out/config.json` (the
    model config and the step) from the checkpoint at `path`."""
    from safetensors.torch import save_file

    if layout_free_intact(path):
        from safetensors.torch import load_file

        weights = {key.split("/", 1)[1]: t for key, t in load_file(str(path / LAYOUT_FREE / TENSORS)).items()
                   if key.startswith("weight/")}
        step = json.loads((path / LAYOUT_FREE / STATE).read_text())["step"]
    else:
        tensors, rest = global_state(path)
        weights, step = tensors["weight"], rest["step"]
    try:
        model = json.loads((path / RUN_CONFIG).read_text())["model"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: no readable model config in {RUN_CONFIG} ({e})") from None
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in weights.items()}, str(out / EXPORT_WEIGHTS),
              metadata={"step": str(step)})
    write_atomic(out / EXPORT_CONFIG, json.dumps({"model": model, "step": step}, indent=1))
    return out


def load_exported(folder: str | Path, parallel=None):
    """PrismLM with the weights of an exported folder (`prism-ckpt export`), at the TP size of
    `parallel` (a ParallelConfig; default TP=1). Call after `parallel.initialize_parallel`;
    every TP rank reads the whole file and keeps its slice."""
    from safetensors.torch import load_file

    from prism_megatron.config import ModelConfig, ParallelConfig
    from prism_megatron.model import PrismLM
    from prism_megatron.sharding import load_global_state_dict

    folder = Path(folder)
    try:
        config = ModelConfig(**json.loads((folder / EXPORT_CONFIG).read_text())["model"])
        weights = load_file(str(folder / EXPORT_WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder} is not an exported model ({type(e).__name__}: {e})") from None
    model = PrismLM(config, parallel or ParallelConfig())
    load_global_state_dict(model, weights)
    return model


# ----------------------------------------------------------------------------------------------
# RNG states, as tensors and ints (nothing that needs pickle to load)


def _gather_rng_states() -> list[dict]:
    _, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss,
             "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def _set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"].tolist()), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
