"""`prism-train`: pretrain a PRISM language model with DeepSpeed.

    prism-train --config launch/configs/tiny.yaml [--set training.train_steps=100 ...] [--resume]

One process per device (torchrun or srun set RANK/WORLD_SIZE/...; a bare call is a single process).
`train` is the whole story: check the inputs, join the process groups, then the Trainer
(launch/trainer.py) builds the model, the engine and the data, restores the newest checkpoint if
asked, and steps, evaluates, logs and checkpoints until `training.train_steps`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from prism_megatron.data_prep.store import TokenStoreError
from prism_megatron.files import DiskError
from prism_megatron.launch import checkpoint, preemption, preflight, run_lock
from prism_megatron.launch.config import ConfigError, RunConfig, load_config

log = logging.getLogger("prism-train")

if TYPE_CHECKING:
    from prism_megatron.launch.trainer import RunSummary

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prism-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in checkpoint.dir (if any)")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="with --resume: accept a change of KEY (e.g. data.stores) from the checkpoint's "
                             "config that makes the continuation another run (repeatable)")
    args = parser.parse_args(argv)
    if args.allow_change and not args.resume:
        parser.error("--allow-change applies only with --resume")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = load_config(args.config, args.set)
        train(cfg, resume=args.resume, allow_change=args.allow_change)
    except preemption.RunStopped as e:
        preemption.write_status(e.exit_code, str(e))
        print(f"prism-train: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except DiskError as e:
        preemption.write_status(preemption.DISK_EXIT, str(e))
        print(f"prism-train: error: {e}", file=sys.stderr)
        sys.exit(preemption.DISK_EXIT)
    except (ConfigError, checkpoint.CheckpointError, TokenStoreError, run_lock.RunLockError) as e:
        preemption.write_status(1, str(e))
        sys.exit(f"prism-train: error: {e}")
    preemption.write_status(0, "finished")


def train(cfg: RunConfig, resume: bool = False, progress=None, allow_change: Sequence[str] = ()) -> RunSummary:
    """Train as `cfg` says; rank 0 hands its progress lines to `progress` (default: the log).
    A resumed run may change the keys in `allow_change` from the checkpoint's config."""
    # Check the inputs, and pick (and check) the checkpoint, before any heavy start-up: bad ones fail fast.
    preflight.check_start(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    # The folder is this run's alone, from before the resume picks a checkpoint to the end (rank 0 holds it).
    lock = run_lock.RunLock(cfg.checkpoint.dir, cfg.training.fault_timeout) if os.environ.get("RANK", "0") == "0" else None
    # A requeued job waits for its predecessor, but not past the moment the other ranks, waiting for
    # rank 0 to join the process group, give up on it (after fault_timeout).
    patience = cfg.training.fault_timeout - min(30.0, cfg.training.fault_timeout / 4)
    if lock is not None and (took_over := lock.acquire(patience)):
        log.warning(took_over)
    try:
        return _train_holding_the_folder(cfg, resume, progress, allow_change, lock)
    finally:
        if lock is not None:
            lock.release()


def _train_holding_the_folder(cfg: RunConfig, resume: bool, progress, allow_change: Sequence[str],
                              lock: run_lock.RunLock | None) -> RunSummary:
    # From here on a preemption signal only sets a flag, which the loop checks once a step.
    stop = preemption.StopRequest()
    start_from = _checkpoint_to_resume(cfg, resume)
    config_changes = preflight.check_resume(cfg, start_from, allow_change) if start_from is not None else ""
    from prism_megatron.data_prep.verify import open_training_stores
    stores = open_training_stores(cfg.data.stores, cfg.model.vocab_size)  # fit the model, or fail fast

    from prism_megatron.launch.trainer import Trainer
    from prism_megatron.process_groups import initialize_parallel

    # A bare call becomes rank 0 of 1 (and sets RANK etc., which DeepSpeed needs to skip MPI discovery).
    initialize_parallel(cfg.parallel, cfg.training.seed, timeout=cfg.training.fault_timeout)
    trainer = Trainer(cfg, stop, progress, lock)
    try:
        trainer.build(stores, start_from, resume, config_changes)
        return trainer.train()
    finally:
        trainer.close()


def _checkpoint_to_resume(cfg: RunConfig, resume: bool) -> Path | None:
    """The newest intact checkpoint under --resume; refuses to start afresh over committed ones."""
    ckpt_dir = Path(cfg.checkpoint.dir)
    if resume:
        return checkpoint.newest(ckpt_dir)
    if checkpoint.committed(ckpt_dir):
        raise checkpoint.CheckpointError(
            f"{ckpt_dir} already holds checkpoints (newest {checkpoint.committed(ckpt_dir)[-1].name}); "
            "pass --resume to continue that run, or choose another checkpoint.dir")
    return None


if __name__ == "__main__":
    main()
