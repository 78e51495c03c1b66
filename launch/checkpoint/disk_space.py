"""Disk space for checkpoints. Before a save (and before a run trains), `require_room` compares the
free space of checkpoint.dir with what a checkpoint takes: the newest committed one, or before the
first an estimate from the model's and optimizer's state (`state_bytes`). A save the storage
refuses anyway (full, over quota, failing) removes its own partial folder in
`removed_if_refused`, so the previous checkpoint stays the newest, whole.

    save_bytes = disk_space.state_bytes(num_parameters, weight_bytes=2)
    disk_space.require_room(ckpt_dir, save_bytes)
    with disk_space.removed_if_refused(ckpt_dir, step, save_bytes):
        checkpoint.save(...)

Both raise DiskError, one line naming the folder, what a save needs and what is free; the run then
ends with DISK_EXIT (74), which slurm/train.sbatch does not requeue.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from prism_megatron.files import DiskError, disk_error_reason, folder_bytes, free_bytes, human_bytes
from prism_megatron.launch.checkpoint.format import COMPLETE, LAYOUT_FREE, committed, is_committed, tag_for

# Adam's state per parameter in a checkpoint besides the weight: an fp32 master copy, two fp32 moments.
OPTIMIZER_BYTES_PER_PARAMETER = 3 * 4


def state_bytes(num_parameters: int, weight_bytes: int) -> int:
    """What a checkpoint of a model of `num_parameters` takes, the weights stored in `weight_bytes`
    each (2 in bf16, 4 in fp32): the estimate for a run's first save."""
    return num_parameters * (weight_bytes + OPTIMIZER_BYTES_PER_PARAMETER)


def bytes_needed(ckpt_dir: Path, estimate: int) -> tuple[int, str]:
    """What the next save will take, and what that number is: the newest committed checkpoint's
    files (without its layout-free form, which a save does not write), or `estimate`."""
    found = committed(ckpt_dir)
    if not found:
        return estimate, "the model and optimizer state"
    newest = found[-1]
    return folder_bytes(newest) - folder_bytes(newest / LAYOUT_FREE), f"the size of {newest.name}"


def require_room(ckpt_dir: Path, estimate: int) -> None:
    """Raise DiskError on every rank, before anything is written, if checkpoint.dir has less free
    space than a save needs (rank 0 decides for all: a collective once torch.distributed is up)."""
    verdict = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        needed, basis = bytes_needed(ckpt_dir, estimate)
        free = free_bytes(ckpt_dir)
        if free < needed:
            verdict = [f"checkpoint.dir {ckpt_dir}: not enough free space for a checkpoint: a save needs "
                       f"{human_bytes(needed)} ({basis}), {human_bytes(free)} free; free some space, then "
                       "run again with --resume"]
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise DiskError(verdict[0], "not enough free space")


@contextmanager
def removed_if_refused(ckpt_dir: Path, step: int, estimate: int):
    """Around this rank's part of the save of `step`: if the storage refuses a write, remove the
    step's folder (unless the save was already committed) and raise DiskError saying so."""
    try:
        yield
    except Exception as e:
        reason = disk_error_reason(e)
        if reason is None:
            raise
        folder = Path(ckpt_dir) / tag_for(step)
        done = is_committed(folder)
        if not done:
            # Uncommit first, as any removal of a checkpoint does.
            (folder / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
        found = committed(ckpt_dir)
        needed, basis = bytes_needed(ckpt_dir, estimate)
        what = (f"the save of step {step} was committed, then a write failed ({reason})" if done else
                f"the save of step {step} failed ({reason}) and its partial {folder.name} is removed; the "
                f"newest checkpoint is {found[-1].name if found else 'none'}")
        raise DiskError(f"checkpoint.dir {ckpt_dir}: {what}; a save needs {human_bytes(needed)} ({basis}), "
                        f"{human_bytes(free_bytes(ckpt_dir))} free; free some space, then run again with "
                        "--resume", reason) from e

