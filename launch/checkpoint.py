"""Checkpoints: DeepSpeed's files plus what DeepSpeed leaves out, committed only once complete.

    DIR/step_00000100/    DeepSpeed's model/optimizer/scheduler files, run_config.json, COMPLETE
    DIR/latest            tag of the newest committed checkpoint (what DeepSpeed's tools read)

DeepSpeed writes its own `latest` before the final barrier of `save_checkpoint`, so a crash can
leave it pointing at a half-written folder. Here every rank saves, all ranks meet at a barrier,
and only then rank 0 writes COMPLETE (the size of every file, so truncation is caught on load)
and `latest`, each atomically. A folder without COMPLETE is not a checkpoint.

DeepSpeed saves neither the RNG states nor the data position; they travel in `client_state`:
the step, the number of samples consumed, and every rank's RNG states.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from prism_megatron.files import write_atomic

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, ckpt_dir: str | Path, state: TrainState, run_config: dict, keep_last: int) -> Path:
    """Save on every rank, then commit on rank 0 after all ranks have finished writing."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(state.step)
    path = ckpt_dir / tag
    if dist.get_rank() == 0 and path.exists():
        # Left by a run that crashed while saving this step: start from an empty folder so no
        # stale file of another world size ends up inside a committed checkpoint.
        shutil.rmtree(path)
    dist.barrier()
    client_state = {"step": state.step, "consumed_samples": state.consumed_samples, "rng": _gather_rng_states()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        write_atomic(path / "run_config.json", json.dumps(run_config, indent=2))
        sizes = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
        write_atomic(path / COMPLETE, json.dumps({"step": state.step, "files": sizes}, indent=1))
        write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return path


def committed(ckpt_dir: str | Path) -> list[Path]:
    """Committed checkpoints in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _TAG.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_TAG.fullmatch(p.name).group(1)))


def newest(ckpt_dir: str | Path) -> Path | None:
    """The newest committed checkpoint, checked for truncated or missing files; None if none."""
    found = committed(ckpt_dir)
    if not found:
        return None
    path = found[-1]
    verify(path)
    return path


def verify(path: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or not the size recorded."""
    try:
        record = json.loads((path / COMPLETE).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {COMPLETE} marker ({e})") from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: {f} has {f.stat().st_size} bytes, "
                                  f"{size} were written")


def load(engine, path: Path) -> TrainState:
    """Restore model, optimizer and scheduler through DeepSpeed, then RNG states; return the position."""
    try:
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    except Exception as e:  # torch.load and DeepSpeed raise many types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: {e}") from e
    if load_path is None or client_state is None or "consumed_samples" not in client_state:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: DeepSpeed found no usable state in it")
    rng_states = client_state["rng"]
    if len(rng_states) == dist.get_world_size():
        _set_rng_state(rng_states[dist.get_rank()])
    else:
        log.warning("checkpoint %s was saved by %d ranks, this run has %d: RNG states not restored",
                    path, len(rng_states), dist.get_world_size())
    return TrainState(step=client_state["step"], consumed_samples=client_state["consumed_samples"])


def _gather_rng_states() -> list[dict]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    if keep_last == 0:
        return
    for old in committed(ckpt_dir)[:-keep_last]:
        # Uncommit first: a crash during rmtree must not leave a "complete" checkpoint with holes.
        (old / COMPLETE).unlink()
        shutil.rmtree(old)
