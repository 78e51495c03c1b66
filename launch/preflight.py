"""What `prism-train` checks before any heavy start-up, so bad input costs seconds, not a run:

- `check_start`: the token stores exist and hold a valid manifest, the output folders can be made,
  and the tensor-parallel size divides the number of processes;
- `check_resume`: a resumed run continues the run its checkpoint recorded (`run_config.json`).

Each failure is a ConfigError (or CheckpointError) naming the key or the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from prism_megatron.launch.checkpoint.format import read_run_config, read_step, run_config_file
from prism_megatron.launch.config import ConfigError, RunConfig, to_dict

# May a resumed run change this key on its own (True: it passes, with a line naming it) or only
# when the user names it with --allow-change (False: refused, the differences listed)? The longest
# dotted prefix of a key decides; every section is listed, so a new field gets its section's rule.
RESUME_MAY_CHANGE: dict[str, bool] = {
    # The model's function and its parameter shapes: the checkpoint holds weights for this one.
    "model": False,
    # Another implementation of the same function, or what its backward keeps; init_std only draws
    # the weights of step 0.
    "model.kernel_backend": True,
    "model.recompute": True,
    "model.fused_ops": True,
    "model.init_std": True,
    # The layout (TP size, sequence parallelism, ZeRO stage) is the checkpoint loader's concern:
    # whether it can reshard is decided there, not by comparing configs.
    "parallel": True,
    "training.zero_stage": True,
    # The global sample order is a function of these: a change alters which tokens come next.
    "data": False,
    "data.num_workers": True,
    # The update rule and the learning-rate schedule: a change makes the continuation another run.
    "optim": False,
    # The global batch, the seed (the sample order and the RNG streams) and the precision (the
    # numerics, and DeepSpeed's optimizer-state layout).
    "training": False,
    # Extending a run (the cosine stretches over the new length), and how the global batch is
    # split into micro batches (the global batch itself is compared above).
    "training.train_steps": True,
    "training.micro_batch_size": True,
    # How the run reacts to faults (non-finite steps, a dead or hung peer), not what it computes.
    "training.nonfinite": True,
    "training.nonfinite_patience": True,
    "training.fault_timeout": True,
    # Where and how often the run writes and reports: not what it computes.
    "checkpoint": True,
    "logging": True,
}


def check_start(cfg: RunConfig, world_size: int) -> None:
    """Checks that need the file system or the launch (the config itself is already validated)."""
    # Imported here: zarr costs a second that a config-only command (and its tests) does not need.
    from prism_megatron.data_prep.store import TokenStore, TokenStoreError

    for i, store in enumerate(cfg.data.stores):
        key = f"data.stores[{i}]"
        if not os.path.exists(store):
            raise ConfigError(f"{key}: {store} does not exist")
        try:
            TokenStore.open(store)
        except OSError as e:  # a manifest that is missing, or a path through a file
            reason = str(e) if e.strerror is None else f"cannot read {e.filename} ({e.strerror})"
            raise ConfigError(f"{key}: {store} is not a token store: {reason}") from None
        except TokenStoreError as e:
            raise ConfigError(f"{key}: {store} is not a token store: {e}") from None
    _check_folder("checkpoint.dir", cfg.checkpoint.dir)
    if cfg.checkpoint.initial_weights:
        _check_initial_weights(cfg)
    _check_folder("logging.tensorboard_dir", cfg.logging.tensorboard_dir)
    tp = cfg.parallel.tensor_model_parallel_size
    if world_size % tp:
        raise ConfigError(f"parallel.tensor_model_parallel_size={tp} does not divide the number of "
                          f"processes ({world_size}); launch a multiple of {tp} processes")


def check_resume(cfg: RunConfig, checkpoint: Path, allow_change: Iterable[str]) -> str:
    """Compare this run's config with the one `checkpoint` recorded; raise ConfigError listing the
    keys whose change breaks the continuation (unless named in `allow_change`). Return a line
    naming the keys that changed (empty if none)."""
    new = _flatten(to_dict(cfg))
    allowed = set(allow_change)
    unknown = sorted(allowed - set(new))
    if unknown:
        raise ConfigError(f"--allow-change {unknown[0]}: unknown key (keys look like data.stores, optim.lr)")
    recorded, step = read_run_config(checkpoint), read_step(checkpoint)
    old = _flatten(recorded)
    # A key the checkpoint does not record did not exist when it was written: that run had the default.
    default = _flatten(to_dict(RunConfig()))
    changed = {key: (old.get(key, default.get(key)), value) for key, value in new.items()
               if old.get(key, default.get(key)) != value}

    def listed(keys) -> str:
        return "; ".join(f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in keys)

    refused = [key for key in changed if not _may_change(key) and key not in allowed]
    if refused:
        raise ConfigError(
            f"{run_config_file(checkpoint)}: this run differs from the checkpoint's where the continuation "
            f"would be another run: {listed(refused)}; pass --allow-change KEY for each change you mean")
    if cfg.training.train_steps < step:
        raise ConfigError(f"training.train_steps={cfg.training.train_steps} is before the step of "
                          f"checkpoint {checkpoint} ({step})")
    return f"config changed since {checkpoint}: {listed(changed)}" if changed else ""


def _may_change(key: str) -> bool:
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in RESUME_MAY_CHANGE:
            return RESUME_MAY_CHANGE[prefix]
    raise KeyError(f"{key}: its section is missing from RESUME_MAY_CHANGE")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"data": {"stores": [...]}} -> {"data.stores": [...]}; lists are values, not sections."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _check_initial_weights(cfg: RunConfig) -> None:
    """The export a fresh run starts from holds weights of this model: its config differs at most in
    what a resume may change (how the model runs, not what it computes)."""
    from prism_megatron.launch.checkpoint import CheckpointError, exported_record

    folder = cfg.checkpoint.initial_weights
    try:
        exported = exported_record(folder)["model"]
    except CheckpointError as e:
        raise ConfigError(f"checkpoint.initial_weights: {e}") from None
    ours = to_dict(cfg)["model"]
    differ = [f"model.{key} is {exported.get(key)!r} there, {ours.get(key)!r} here"
              for key in sorted(set(ours) | set(exported))
              if exported.get(key) != ours.get(key) and not _may_change(f"model.{key}")]
    if differ:
        raise ConfigError(f"checkpoint.initial_weights: {folder} holds the weights of another model: "
                          + "; ".join(differ))


def _check_folder(key: str, folder: str) -> None:
    """The folder exists, or can be made: its nearest existing ancestor is a writable folder."""
    path = Path(folder)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        raise ConfigError(f"{key}: {folder} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {folder}: no permission to write in {existing}")
