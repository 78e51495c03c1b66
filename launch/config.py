"""The run config: plain dataclasses, one per section of a run's YAML file.

    cfg = load_config("launch/configs/tiny.yaml", ["training.train_steps=100", "optim.lr=3e-4"])

Every key of the file must name a field (a typo is an error naming the file and the key), every
value must have the field's type, and `validate` checks the values that make sense only together.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from prism_megatron.config import ModelConfig, ParallelConfig


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the source and the key."""


@dataclass
class DataConfig:
    stores: list[str] = field(default_factory=list)
    # Blend weights, one per store; None weighs every store by its size.
    weights: list[float] | None = None
    seq_length: int = 1024
    valid_fraction: float = 0.01
    num_workers: int = 0
    # Give the model each sample's document boundaries so its state resets at them.
    with_cu_seqlens: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainingConfig:
    train_steps: int = 1000
    micro_batch_size: int = 8
    # Samples per optimizer step over all data-parallel ranks; the rest is gradient accumulation.
    global_batch_size: int = 8
    seed: int = 1234
    zero_stage: int = 1
    # "auto": bf16 where the device supports it, fp32 otherwise.
    precision: str = "auto"
    # A step whose loss or gradient norm is not finite is never applied: the run logs it, goes on,
    # and stops (exit code 65) after nonfinite_patience of them in a row, since such a run no longer
    # makes progress. "skip" rides out transient spikes, "stop" ends a broken run soon: unless set,
    # the patience is NONFINITE_PATIENCE's for the mode (10 for skip, 3 for stop).
    nonfinite: str = "skip"
    nonfinite_patience: int | None = None
    # Seconds without progress (a step, an evaluation batch, a save) before a rank gives up on a
    # peer that died or hangs; also the collectives' timeout.
    fault_timeout: float = 900.0


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    save_interval: int = 1000
    # How many committed checkpoints to keep (the newest ones); 0 keeps all.
    keep_last: int = 2
    # An export folder (prism-ckpt export) whose weights a run starts from when it has no checkpoint
    # to resume: continued pretraining or fine-tuning, with a fresh optimizer, schedule and data order.
    initial_weights: str = ""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int = 100
    eval_steps: int = 10
    tensorboard_dir: str = "runs/default/tensorboard"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


PRECISIONS = ("auto", "bf16", "fp32")
NONFINITE_MODES = ("skip", "stop")
# training.nonfinite_patience when it is not set, per training.nonfinite mode.
NONFINITE_PATIENCE = {"skip": 10, "stop": 3}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `section.key=value` overrides, and validate the result."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    cfg = _build(RunConfig, raw, source=str(path), prefix="")
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg, source=str(path))
    return cfg


def apply_override(cfg: RunConfig, item: str) -> None:
    """Set one `a.b=value` override in place; the value is parsed as a YAML scalar or list."""
    source = f"--set {item}"
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{source}: expected section.key=value")
    *parents, name = key.strip().split(".")
    target: Any = cfg
    for depth, part in enumerate(parents):
        if not dataclasses.is_dataclass(target) or part not in _field_types(type(target)):
            raise ConfigError(f"{source}: unknown key {'.'.join(parents[: depth + 1])!r}")
        target = getattr(target, part)
    if not dataclasses.is_dataclass(target) or name not in _field_types(type(target)):
        raise ConfigError(f"{source}: unknown key {key.strip()!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: the value is not valid YAML: {_one_line(e)}") from None
    setattr(target, name, _coerce(value, _field_types(type(target))[name], source, key.strip()))


def validate(cfg: RunConfig, source: str) -> None:
    """Checks on values that are wrong whatever their type; raise ConfigError naming the key."""

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: {why}")

    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    tp = cfg.parallel.tensor_model_parallel_size
    check(tp >= 1, "parallel.tensor_model_parallel_size", "must be >= 1")
    d, o, t, c, lg = cfg.data, cfg.optim, cfg.training, cfg.checkpoint, cfg.logging
    # Tensor parallelism splits whole heads, the MLP's hidden units and, with sequence
    # parallelism, the sequence: each must divide by the TP size.
    for key, size in (("model.num_heads", cfg.model.num_heads), ("model.ffn_hidden_size", cfg.model.ffn_hidden_size),
                      *([("data.seq_length", d.seq_length)] if cfg.parallel.sequence_parallel else [])):
        check(size % tp == 0, key, f"{size} does not divide by parallel.tensor_model_parallel_size={tp}")
    check(len(d.stores) > 0, "data.stores", "name at least one token store")
    check(d.weights is None or len(d.weights) == len(d.stores), "data.weights",
          f"give one weight per store ({len(d.stores)}), got {len(d.weights or [])}")
    check(d.weights is None or all(w > 0 for w in d.weights), "data.weights", "weights must be > 0")
    check(d.seq_length > 0, "data.seq_length", "must be > 0")
    cp = cfg.parallel.context_parallel_size
    check(cp >= 1 and d.seq_length % cp == 0, "parallel.context_parallel_size",
          f"must be >= 1 and divide data.seq_length {d.seq_length}, got {cp}")
    check(0 < d.valid_fraction < 1, "data.valid_fraction", "must be in (0, 1)")
    check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    check(o.lr > 0, "optim.lr", "must be > 0")
    check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}]")
    check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two values in [0, 1)")
    check(o.eps > 0, "optim.eps", "must be > 0")
    check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    check(t.train_steps > 0, "training.train_steps", "must be > 0")
    check(o.warmup_steps <= t.train_steps, "optim.warmup_steps", f"must be <= training.train_steps={t.train_steps}")
    check(t.micro_batch_size > 0, "training.micro_batch_size", "must be > 0")
    check(t.global_batch_size > 0, "training.global_batch_size", "must be > 0")
    check(t.global_batch_size % t.micro_batch_size == 0, "training.global_batch_size",
          f"must be a multiple of training.micro_batch_size={t.micro_batch_size}")
    # ZeRO-0 in fp32 reports no gradient norm, and ZeRO-1 costs it nothing on one rank.
    check(t.zero_stage in (1, 2, 3), "training.zero_stage", "must be 1, 2 or 3")
    check(t.precision in PRECISIONS, "training.precision", f"must be one of {PRECISIONS}")
    check(t.nonfinite in NONFINITE_MODES, "training.nonfinite", f"must be one of {NONFINITE_MODES}")
    check(t.nonfinite_patience is None or t.nonfinite_patience > 0, "training.nonfinite_patience",
          "must be > 0 (or null: 10 for skip, 3 for stop)")
    check(t.fault_timeout > 0, "training.fault_timeout", "must be > 0 (seconds)")
    check(bool(c.dir), "checkpoint.dir", "must name a folder")
    check(c.save_interval > 0, "checkpoint.save_interval", "must be > 0")
    check(c.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps all)")
    check(lg.log_interval > 0, "logging.log_interval", "must be > 0")
    check(lg.eval_interval > 0, "logging.eval_interval", "must be > 0")
    check(lg.eval_steps > 0, "logging.eval_steps", "must be > 0")
    check(bool(lg.tensorboard_dir), "logging.tensorboard_dir", "must name a folder")


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain data (what a run records next to its logs)."""
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'the top level'} must be a mapping, got {type(raw).__name__}")
    types_ = _field_types(cls)
    values = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"{source}: unknown key {name!r} (known in this section: {', '.join(types_)})")
        values[key] = _coerce(value, types_[key], source, name)
    return cls(**values)


def _coerce(value: Any, kind: Any, source: str, name: str) -> Any:
    """Check `value` against the annotation `kind` (recursing into dataclasses, lists, optionals)."""
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, source, f"{name}.")
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, source, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], source, f"{name}[{i}]") for i, v in enumerate(value)]
    # bool is an int to Python; a YAML `true` for an int field (or 1 for a bool) is a mistake.
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # YAML 1.1 reads 1e-3 (no dot) as a string; a string that is a finite number is meant as one.
    if kind is float and isinstance(value, str) and _is_finite_number(value):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str) and isinstance(value, kind):
        return value
    # YAML 1.1 reads on/off as booleans: for a string field (model.fused_ops: on | off) they mean the words.
    if kind is str and isinstance(value, bool):
        return "on" if value else "off"
    raise ConfigError(f"{source}: {name}: expected {kind.__name__}, got {value!r}")


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where (line:column)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
