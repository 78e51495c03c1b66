"""Saving: a checkpoint is committed only once every rank has finished writing it.

DeepSpeed writes its own `latest` before the final barrier of `save_checkpoint`, so a crash can
leave it pointing at a half-written folder. Here every rank saves, all ranks meet at a barrier, the
ranks hash the files between them, and only then rank 0 writes COMPLETE (every file's size and
sha256) and `latest`, each atomically. Older checkpoints are pruned only after that commit.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from prism_megatron.launch.checkpoint.format import (Layout, committed, file_record, is_committed, remove,
                                                     step_folders, tag_for, write_complete, write_latest,
                                                     write_layout, write_run_config)
from prism_megatron.launch.checkpoint.rng import gather_rng_states
from prism_megatron.launch.checkpoint.safe_load import safe_checkpoint_engine


@dataclass
class TrainState:
    """Where a run is: what a checkpoint records besides DeepSpeed's state and the RNG states."""
    step: int = 0
    consumed_samples: int = 0


def save(engine, ckpt_dir: str | Path, state: TrainState, run_config: dict, keep_last: int) -> Path:
    """Save on every rank, then commit on rank 0 after all ranks have finished writing."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / tag_for(state.step)
    if dist.get_rank() == 0 and path.exists():
        # Left by a run that crashed while saving this step (or skipped as damaged): start from an
        # empty folder so no stale file of another layout ends up inside a committed checkpoint.
        remove(path)
    dist.barrier()
    engine.checkpoint_engine = safe_checkpoint_engine()
    client_state = {"step": state.step, "consumed_samples": state.consumed_samples, "rng": gather_rng_states()}
    engine.save_checkpoint(str(ckpt_dir), tag=path.name, client_state=client_state, save_latest=False)
    if dist.get_rank() == 0:
        write_run_config(path, run_config)
        write_layout(path, current_layout(engine), engine.module)
    dist.barrier()
    files = sorted(str(f.relative_to(path)) for f in path.iterdir() if f.is_file())
    mine = {name: file_record(path / name) for name in files[dist.get_rank()::dist.get_world_size()]}
    records: list = [None] * dist.get_world_size()
    dist.all_gather_object(records, mine)
    if dist.get_rank() == 0:
        write_complete(path, state.step, {k: v for r in records for k, v in sorted(r.items())})
        write_latest(ckpt_dir, path)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return path


def current_layout(engine) -> Layout:
    from prism_megatron.process_groups import tp_size

    return Layout(tp_size(), dist.get_world_size() // tp_size(), int(engine.zero_optimization_stage()))


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Called only after the newest checkpoint is committed, so the ones removed are never the last.
    Folders of saves that never finished, older than the newest checkpoint, go too (nothing reads them)."""
    for path in step_folders(ckpt_dir)[:-1]:
        if not is_committed(path):
            shutil.rmtree(path)
    if keep_last:
        for old in committed(ckpt_dir)[:-keep_last]:
            remove(old)
