"""`prism-train`: pretrain a PRISM language model with DeepSpeed.

    prism-train --config launch/configs/tiny.yaml [--set training.train_steps=100 ...] [--resume]

One process per device (torchrun or srun set RANK/WORLD_SIZE/...; a bare call is a single process).
The loop below is the whole story: build the model, the optimizer and the engine, restore the
newest checkpoint if asked, then step, evaluate, log and checkpoint until `training.train_steps`.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from prism_megatron.data_prep.store import TokenStoreError
from prism_megatron.files import DiskError, disk_error_reason, disk_errors_named
from prism_megatron.launch import checkpoint, disk_space, preemption, preflight, run_lock
from prism_megatron.launch.config import ConfigError, RunConfig, TrainingConfig, load_config, to_dict

log = logging.getLogger("prism-train")

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunSummary:
    """What a finished run reports (the demo prints it)."""

    train_losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_sec: float = 0.0
    num_parameters: int = 0
    checkpoint: str = ""
    tensorboard_dir: str = ""


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
    ckpt_dir = Path(cfg.checkpoint.dir)
    # Check the inputs, and pick (and check) the checkpoint, before any heavy start-up: bad ones fail fast.
    preflight.check_start(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    # The folder is this run's alone, from before the resume picks a checkpoint to the end (rank 0 holds it).
    lock = run_lock.RunLock(ckpt_dir, cfg.training.fault_timeout) if os.environ.get("RANK", "0") == "0" else None
    if lock is not None and (took_over := lock.acquire()):
        log.warning(took_over)
    # From here on a preemption signal only sets a flag, which the loop checks once a step.
    stop = preemption.StopRequest()
    start_from = checkpoint.newest(ckpt_dir) if resume else None
    config_changes = preflight.check_resume(cfg, start_from, allow_change) if start_from is not None else ""
    if not resume and checkpoint.committed(ckpt_dir):
        raise checkpoint.CheckpointError(
            f"{ckpt_dir} already holds checkpoints (newest {checkpoint.committed(ckpt_dir)[-1].name}); "
            "pass --resume to continue that run, or choose another checkpoint.dir")
    from prism_megatron.data_prep.verify import ShardVerifier, open_training_stores
    stores = open_training_stores(cfg.data.stores, cfg.model.vocab_size)  # fit the model, or fail fast

    from prism_megatron.data_prep.loader import DistributedBatchLoader, PackedDataset, collate_samples
    from prism_megatron.flops import PEAK_FLOPS_ENV, mfu, peak_flops, step_flops
    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import data_rank, data_size, deepspeed_mpu, destroy_parallel, initialize_parallel

    # A bare call becomes rank 0 of 1 (and sets RANK etc., which DeepSpeed needs to skip MPI discovery).
    initialize_parallel(cfg.parallel, cfg.training.seed, timeout=cfg.training.fault_timeout)
    mpu = deepspeed_mpu()
    # Ranks reading different samples; DeepSpeed's data-parallel group also spans the CP ranks.
    dp_rank, dp_size = data_rank(), data_size()
    rank0 = dist.get_rank() == 0
    progress = (progress or log.info) if rank0 else (lambda line: None)
    t = cfg.training
    grad_accum = grad_accumulation_steps(cfg, dp_size)  # checked before the model is built

    model = PrismLM(cfg.model, cfg.parallel)
    # Counted before ZeRO-3 can partition the parameters away.
    summary = RunSummary(num_parameters=model.num_parameters(), tensorboard_dir=cfg.logging.tensorboard_dir)
    engine, optimizer = build_engine(cfg, model)
    save_bytes = disk_space.state_bytes(summary.num_parameters, weight_bytes=2 if use_bf16(t) else 4)
    disk_space.require_room(ckpt_dir, save_bytes)  # a full disk stops the run before it trains

    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    progress(f"model: {summary.num_parameters:,} parameters, solver {cfg.model.solver} | {dist.get_world_size()} "
             f"ranks, dp {dp_size}, grad accum {grad_accum}, ZeRO-{t.zero_stage}, {'bf16' if use_bf16(t) else 'fp32'} | "
             f"{t.train_steps} steps of {tokens_per_step:,} tokens")
    flops = step_flops(cfg.model, cfg.data.seq_length)
    peak = peak_flops()
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU"
    progress(f"model FLOPs: {flops.total:.4g} a token, forward and backward (6N: {flops.six_n:.4g}) | "
             + (f"MFU against {peak / 1e12:g} TFLOP/s per device" if peak is not None
                else f"no MFU: the peak FLOP/s of {device_name} is unknown (set {PEAK_FLOPS_ENV})"))

    state = checkpoint.TrainState()
    if start_from is not None:
        state = checkpoint.load(engine, start_from)
        progress(f"resumed from {start_from} at step {state.step} ({state.consumed_samples} samples consumed)")
        if config_changes:
            progress(config_changes)
    elif resume:
        progress(f"no complete checkpoint in {ckpt_dir}: starting from scratch")

    d = cfg.data
    verifier = ShardVerifier(stores, cfg.model.vocab_size)  # checksums, in the background
    train_data = PackedDataset(d.stores, d.weights, d.seq_length, t.seed, t.train_steps * t.global_batch_size,
                               split="train", valid_fraction=d.valid_fraction)
    batches = iter(DistributedBatchLoader(train_data, t.micro_batch_size, dp_rank, dp_size,
                                          consumed_samples=state.consumed_samples,
                                          num_workers=d.num_workers, with_cu_seqlens=d.with_cu_seqlens, verifier=verifier))
    # The same held-out samples at every evaluation and at every DP size, so the val curve compares
    # like with like (also across a resume at another layout); DP rank r takes samples r, r + dp, ...
    eval_samples = cfg.logging.eval_steps * t.micro_batch_size
    valid_data = PackedDataset(d.stores, d.weights, d.seq_length, t.seed, eval_samples,
                               split="valid", valid_fraction=d.valid_fraction)

    def evaluate() -> float | None:
        """The mean validation loss; None if a stop request cut the evaluation short."""
        engine.eval()
        mine = range(dp_rank, len(valid_data), dp_size)
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss x samples, samples
        with torch.no_grad():
            # As many rounds on every rank as on the one with the most samples (rank 0): the stop
            # check is a collective.
            rounds = -(-len(range(0, len(valid_data), dp_size)) // t.micro_batch_size)
            for start in range(0, rounds * t.micro_batch_size, t.micro_batch_size):
                watchdog.beat("an evaluation batch")
                if stop.requested(engine.device):
                    engine.train()
                    return None
                ids = mine[start:start + t.micro_batch_size]
                if not ids:
                    continue
                batch = collate_samples([valid_data[g] for g in ids], with_cu_seqlens=d.with_cu_seqlens)
                verifier.require(batch.pop("shards"))
                loss = forward(engine, batch).double()
                total += torch.stack([loss * len(ids), total.new_tensor(float(len(ids)))])
        engine.train()
        dist.all_reduce(total, group=mpu.get_data_parallel_group())
        return (total[0] / total[1]).item()

    def save() -> Path:
        """A checkpoint of this step, never of non-finite weights; the log says how long it took."""
        watchdog.beat("the step before a save")
        if not preemption.weights_finite(model, engine.device):
            good = checkpoint.committed(ckpt_dir)
            finish()
            raise preemption.RunStopped(
                f"step {state.step}: the weights are not finite, no checkpoint written "
                f"(the last good one: {good[-1] if good else 'none'})", preemption.NONFINITE_EXIT)
        if lock is not None:
            lock.check()
        disk_space.require_room(ckpt_dir, save_bytes)
        started = time.perf_counter()
        with disk_space.removed_if_refused(ckpt_dir, state.step, save_bytes):
            path = checkpoint.save(engine, ckpt_dir, state, to_dict(cfg), cfg.checkpoint.keep_last)
        progress(f"saved checkpoint {path} in {time.perf_counter() - started:.2f} s")
        watchdog.beat("a save")
        return path

    metrics = MetricsLog(cfg.logging.tensorboard_dir) if rank0 else None
    _record(metrics, {"step": state.step, "num_parameters": summary.num_parameters})

    def finish() -> None:
        """The end of a run, at train_steps or earlier (all ranks together)."""
        watchdog.stop()
        if metrics is not None:
            metrics.close()
        destroy_parallel()
        if lock is not None:
            lock.release()

    def at(step: int) -> str:
        return f"step {step:>{len(str(t.train_steps))}}/{t.train_steps}"

    watchdog = preemption.Watchdog(t.fault_timeout)
    nonfinite = preemption.NonFiniteSteps(t.nonfinite, t.nonfinite_patience)
    if state.step == 0 and (val_loss := evaluate()) is not None:
        summary.val_losses[0] = val_loss
        _record(metrics, {"step": 0, "val_loss": val_loss})
        progress(f"{at(0)} | val loss {val_loss:.4f}")

    interval_time, interval_steps = 0.0, 0
    # Throughput over this process's steps after its first (which pays for allocations, warm-up).
    timed_steps, timed_total, first_step = 0, 0.0, state.step + 1
    while state.step < t.train_steps:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        micro_losses = []
        skipped_before = engine.skipped_steps
        for _ in range(grad_accum):
            loss = forward(engine, next(batches))
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.detach().float())
        loss = dp_mean(torch.stack(micro_losses).mean(), mpu)
        grad_norm = float(engine.get_global_grad_norm())
        state.step += 1
        watchdog.beat(f"step {state.step}")
        try:
            skip_line = nonfinite.check(state.step, loss, grad_norm, engine.skipped_steps > skipped_before)
        except preemption.RunStopped:
            finish()
            raise
        if skip_line:
            progress(skip_line)
            _record(metrics, {"step": state.step, "skipped_steps": nonfinite.skipped})
        state.consumed_samples += t.global_batch_size
        elapsed = time.perf_counter() - started
        interval_time += elapsed
        interval_steps += 1
        if state.step > first_step:
            timed_steps, timed_total = timed_steps + 1, timed_total + elapsed
        summary.train_losses[state.step] = loss
        _record(metrics, {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm})

        if state.step % cfg.logging.log_interval == 0 or state.step == t.train_steps:
            tokens_per_sec = interval_steps * tokens_per_step / interval_time
            throughput = {"step": state.step, "tokens_per_sec": tokens_per_sec}
            line = f"{tokens_per_sec:,.0f} tokens/s"
            if peak is not None:
                throughput["mfu"] = mfu(flops.total, tokens_per_sec, dist.get_world_size(), peak)
                line += f" | MFU {100 * throughput['mfu']:.1f}%"
            if torch.cuda.is_available():  # this rank's peak since the last log line
                throughput["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
                torch.cuda.reset_peak_memory_stats()
                line += f" | peak memory {throughput['peak_memory_gb']:.1f} GB"
            _record(metrics, throughput)
            progress(f"{at(state.step)} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | {line}")
            interval_time, interval_steps = 0.0, 0

        if ((state.step % cfg.logging.eval_interval == 0 or state.step == t.train_steps)
                and (val_loss := evaluate()) is not None):
            summary.val_losses[state.step] = val_loss
            _record(metrics, {"step": state.step, "val_loss": val_loss})
            progress(f"{at(state.step)} | val loss {val_loss:.4f}")

        stopping = stop.requested(engine.device) and state.step < t.train_steps
        if stopping:
            progress(f"{at(state.step)} | stop requested ({stop.reason()}): saving")
        if stopping or state.step % cfg.checkpoint.save_interval == 0 or state.step == t.train_steps:
            summary.checkpoint = str(save())
        if stopping:
            finish()
            raise preemption.RunStopped(
                f"stopped by {stop.reason()} after step {state.step}, saved in {summary.checkpoint}; "
                f"exit code {preemption.REQUEUE_EXIT}: run again with --resume to continue",
                preemption.REQUEUE_EXIT)

    summary.tokens_per_sec = timed_steps * tokens_per_step / timed_total if timed_total else 0.0
    finish()
    return summary


def build_engine(cfg: RunConfig, model: torch.nn.Module):
    """The DeepSpeed engine that trains `model` as `cfg` says, and the AdamW it wraps (whose
    param_groups hold the current learning rate); benchmarks time this engine. Call after
    initialize_parallel."""
    # Without a GPU, megatron-core warns at import that fused kernels are missing, and DeepSpeed that
    # it picked the CPU: expected here, noise in every run's output.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from prism_megatron.process_groups import data_size, deepspeed_mpu

    ds_logger.setLevel(logging.WARNING)
    t, o = cfg.training, cfg.optim
    # An optimizer instance, not DeepSpeed's "optimizer" config entry (which fails at initialize on
    # the GPU image, see shared/device/NOTES.md); fused on GPUs.
    optimizer = torch.optim.AdamW(weight_decay_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                  eps=o.eps, fused=torch.cuda.is_available())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / o.lr)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=deepspeed_mpu(),
        config={
            "train_batch_size": t.global_batch_size * cfg.parallel.context_parallel_size,
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": grad_accumulation_steps(cfg, data_size()),
            "gradient_clipping": o.grad_clip,
            "zero_optimization": {"stage": t.zero_stage},
            # Skip updates from non-finite gradients in bf16 as ZeRO does in fp32. Each bf16 gradient is
            # added to its float32 accumulator as soon as it is ready and then freed, so the bf16
            # gradients of the whole model never exist at once.
            "bf16": {"enabled": use_bf16(t), "check_grad_overflow": True, "immediate_grad_update": True},
            # Gradients accumulate over micro batches in float32 (DeepSpeed's default for bf16 is bf16).
            # At ZeRO-1 this selects DeepSpeed's bf16 optimizer, which also checks for non-finite
            # gradients through the global norm alone, not with a pass over every gradient.
            "data_types": {"grad_accum_dtype": "fp32"},
            # ZeRO wraps our AdamW instance.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 62,
        })
    return engine, optimizer


def use_bf16(training: TrainingConfig) -> bool:
    """bf16 as training.precision says: always, never, or (auto) where the device supports it."""
    return training.precision == "bf16" or (
        training.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def grad_accumulation_steps(cfg: RunConfig, dp_size: int) -> int:
    """Micro batches per optimizer step on each data-parallel rank."""
    t = cfg.training
    if t.global_batch_size % (t.micro_batch_size * dp_size):
        raise ConfigError(f"training.global_batch_size={t.global_batch_size} must be a multiple of "
                          f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp_size}")
    return t.global_batch_size // (t.micro_batch_size * dp_size)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weights and embeddings decay; biases, norms and other vectors do not.
    By name as well as by shape, since per-head parameters carry a head dimension: the solver's
    gain_bias [H, L, V] is a bias all the same."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or name.endswith("bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to optim.lr over warmup_steps, then a cosine down to optim.min_lr at train_steps."""
    o, total = cfg.optim, cfg.training.train_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def forward(engine, batch: dict) -> torch.Tensor:
    from prism_megatron.context_parallel import slice_batch

    batch = slice_batch(batch)  # this rank's part of each sample under context parallelism
    tokens, labels = batch["tokens"].to(engine.device), batch["labels"].to(engine.device)
    if "cu_seqlens" in batch:
        return engine(tokens, labels, cu_seqlens=batch["cu_seqlens"].to(engine.device))
    return engine(tokens, labels)


def dp_mean(value: torch.Tensor, mpu) -> float:
    """Mean of a scalar over the data-parallel ranks (the model-parallel ranks already agree)."""
    value = value.detach().to(torch.float64).clone()  # on the device: NCCL reduces no CPU tensors
    dist.all_reduce(value, group=mpu.get_data_parallel_group())
    return value.item() / mpu.get_data_parallel_world_size()


class MetricsLog:
    """Rank 0's record of a run: TensorBoard scalars, and the same numbers as JSON lines.

    The JSON file (`metrics.jsonl` next to the event files) is appended to, so a resumed run
    continues it; where a step appears twice (work redone after a crash), the last line counts.
    """

    _SCALARS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "lr", "grad_norm": "grad_norm",
                "tokens_per_sec": "tokens_per_sec", "mfu": "mfu", "peak_memory_gb": "peak_memory_gb",
                "num_parameters": "num_parameters"}

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        # A full disk is one line naming the folder (DiskError), never a traceback. TensorBoard
        # writes from a thread of its own, whose disk error the next record() raises.
        self.where = f"logging.tensorboard_dir {folder}"
        threading.excepthook = functools.partial(_quiet_disk_errors, threading.excepthook)
        with disk_errors_named(self.where):
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(folder)
            self.jsonl = open(Path(folder) / METRICS_FILE, "a")

    def record(self, values: dict) -> None:
        with disk_errors_named(self.where):
            for key, value in values.items():
                if key in self._SCALARS:
                    self.writer.add_scalar(self._SCALARS[key], value, values["step"])
            self.jsonl.write(json.dumps(values) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        with disk_errors_named(self.where):
            self.writer.close()
            self.jsonl.close()


def read_metrics(folder: str | Path) -> list[dict]:
    """The records of metrics.jsonl, a later line for the same step and keys replacing an earlier one."""
    latest: dict[tuple, dict] = {}
    for line in (Path(folder) / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        latest[(record["step"], tuple(sorted(record)))] = record
    return sorted(latest.values(), key=lambda r: r["step"])


def _quiet_disk_errors(hook, args) -> None:
    if disk_error_reason(args.exc_value) is None:
        hook(args)


def _record(metrics: MetricsLog | None, values: dict) -> None:
    if metrics is not None:
        metrics.record(values)


if __name__ == "__main__":
    main()
