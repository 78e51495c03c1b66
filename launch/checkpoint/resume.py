"""Loading a checkpoint into a training engine: at the layout that wrote it through DeepSpeed,
bitwise (RNG states included); at another (ZeRO-1/2) from its layout-free form (layout_free.py),
converted on first use and kept next to it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from prism_megatron.launch.checkpoint.commit import TrainState, current_layout
from prism_megatron.launch.checkpoint.format import LAYOUT_FREE, CheckpointError, read_layout, vanished, verify
from prism_megatron.launch.checkpoint.layout_free import convert, layout_free_intact, load_layout_free
from prism_megatron.launch.checkpoint.rng import set_rng_state
from prism_megatron.launch.checkpoint.safe_load import safe_checkpoint_engine

log = logging.getLogger(__name__)


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
    set_rng_state(client_state["rng"][dist.get_rank()])
    return TrainState(step=client_state["step"], consumed_samples=client_state["consumed_samples"])
