"""A training run made of parts, as torchtitan's Trainer: `Trainer.build` makes them in order,
`Trainer.train` steps until training.train_steps, `Trainer.close` ends whatever was started,
whichever way the run ends.

- `Trainer.train_step`: the grad-accumulation micro batches of one optimizer step -> the loss, the
  gradient norm and training.nonfinite's verdict on them;
- `Metrics`: rank 0's records and log lines: throughput, MFU, peak memory, and when to log;
- `Evaluator` (evaluate.py): the validation loss;
- `Checkpoints`: when to save, and the saving, never of non-finite weights.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from prism_megatron.data_prep.loader import DistributedBatchLoader, PackedDataset
from prism_megatron.data_prep.store import TokenStore
from prism_megatron.data_prep.verify import ShardVerifier
from prism_megatron.flops import PEAK_FLOPS_ENV, mfu, peak_flops, step_flops
from prism_megatron.launch import checkpoint, preemption
from prism_megatron.launch.checkpoint import disk_space
from prism_megatron.launch.config import RunConfig, to_dict
from prism_megatron.launch.engine import build_engine, dp_mean, forward, grad_accumulation_steps, use_bf16
from prism_megatron.launch.evaluate import Evaluator
from prism_megatron.launch.metrics import MetricsLog
from prism_megatron.launch.run_lock import RunLock
from prism_megatron.model import PrismLM
from prism_megatron.sharding import load_global_state_dict
from prism_megatron.process_groups import data_rank, data_size, deepspeed_mpu, destroy_parallel

log = logging.getLogger("prism-train")


@dataclass
class RunSummary:
    """What a finished run reports (the demo prints it)."""

    train_losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_sec: float = 0.0
    num_parameters: int = 0
    checkpoint: str = ""
    tensorboard_dir: str = ""


def every(step: int, interval: int, last: int) -> bool:
    """Whether `step` is a multiple of `interval` or the run's last: when a run logs, evaluates, saves."""
    return step % interval == 0 or step == last


class Trainer:
    """One run's parts and its loop. Call after initialize_parallel; `close` leaves the process groups."""

    def __init__(self, cfg: RunConfig, stop: preemption.StopRequest, progress: Callable[[str], None] | None = None,
                 lock: RunLock | None = None):
        self.cfg, self.stop, self.lock = cfg, stop, lock
        self.rank0 = dist.get_rank() == 0
        # Rank 0 hands its progress lines to `progress` (default: the log); the others say nothing.
        self.progress = (progress or log.info) if self.rank0 else (lambda line: None)
        self.metrics: Metrics | None = None
        self.watchdog: preemption.Watchdog | None = None

    def build(self, stores: Sequence[TokenStore], start_from: Path | None, resume: bool, config_changes: str) -> None:
        """The parts, in order: model and engine, the state to start from, data, records, watchdog."""
        cfg, t = self.cfg, self.cfg.training
        # A checkpoint to resume holds the weights; a fresh run may start from an export's.
        self._build_engine(None if start_from is not None else cfg.checkpoint.initial_weights or None)
        # What the first save will take; a full disk stops the run before anything is written (a
        # resume at another layout writes its layout-free form).
        save_bytes = disk_space.state_bytes(self.summary.num_parameters, 2 if use_bf16(t) else 4)
        disk_space.require_room(Path(cfg.checkpoint.dir), save_bytes)
        self.metrics = Metrics(cfg, self.progress, self.rank0)
        self.progress(self.metrics.flops_line())
        self.state = self._restore(start_from, resume, config_changes)

        verifier = ShardVerifier(stores, cfg.model.vocab_size)  # checksums, in the background
        self.batches = iter(self._loader("train", t.train_steps * t.global_batch_size, verifier,
                                         consumed_samples=self.state.consumed_samples,
                                         num_workers=cfg.data.num_workers))
        valid = self._loader("valid", cfg.logging.eval_steps * t.micro_batch_size, verifier, drop_last=False)
        self.metrics.start(self.state.step, self.summary.num_parameters)
        self.watchdog = preemption.Watchdog(t.fault_timeout)
        self.nonfinite = preemption.NonFiniteSteps(t.nonfinite, t.nonfinite_patience)
        self.evaluator = Evaluator(valid, self.engine, self.mpu.get_data_parallel_group(), self.stop, self.watchdog)
        self.checkpoints = Checkpoints(cfg, self.engine, self.model, self.watchdog, self.progress, self.lock,
                                       save_bytes)

    def _build_engine(self, initial_weights: str | None) -> None:
        """The model (with the weights of the export `initial_weights`, if given), the DeepSpeed engine and
        its optimizer; the log lines that say what they are."""
        cfg, t = self.cfg, self.cfg.training
        self.mpu = deepspeed_mpu()
        # Ranks reading different samples; DeepSpeed's data-parallel group also spans the CP ranks.
        dp_size = data_size()
        self.grad_accum = grad_accumulation_steps(cfg, dp_size)  # checked before the model is built
        self.model = PrismLM(cfg.model, cfg.parallel)
        if initial_weights is not None:  # before DeepSpeed copies them into its float32 master weights
            load_global_state_dict(self.model, checkpoint.exported_weights(initial_weights))
            step = checkpoint.exported_record(initial_weights).get("step")
            self.progress(f"weights from {initial_weights} (exported at step {step} of its run)")
        # Counted before ZeRO-3 can partition the parameters away.
        self.summary = RunSummary(num_parameters=self.model.num_parameters(),
                                  tensorboard_dir=cfg.logging.tensorboard_dir)
        self.engine, self.optimizer = build_engine(cfg, self.model)
        self.progress(f"model: {self.summary.num_parameters:,} parameters, solver {cfg.model.solver} | "
                      f"{dist.get_world_size()} ranks, dp {dp_size}, grad accum {self.grad_accum}, "
                      f"ZeRO-{t.zero_stage}, {'bf16' if use_bf16(t) else 'fp32'} | {t.train_steps} steps of "
                      f"{t.global_batch_size * cfg.data.seq_length:,} tokens")

    def _restore(self, start_from: Path | None, resume: bool, config_changes: str) -> checkpoint.TrainState:
        if start_from is None:
            if resume:
                self.progress(f"no complete checkpoint in {Path(self.cfg.checkpoint.dir)}: starting from scratch")
            return checkpoint.TrainState()
        state = checkpoint.load(self.engine, start_from)
        self.progress(f"resumed from {start_from} at step {state.step} ({state.consumed_samples} samples consumed)")
        if config_changes:
            self.progress(config_changes)
        return state

    def _loader(self, split: str, num_samples: int, verifier: ShardVerifier, **options) -> DistributedBatchLoader:
        """This DP rank's micro batches of the first `num_samples` samples of `split`."""
        d, t = self.cfg.data, self.cfg.training
        dataset = PackedDataset(d.stores, d.weights, d.seq_length, t.seed, num_samples, split=split,
                                valid_fraction=d.valid_fraction)
        return DistributedBatchLoader(dataset, t.micro_batch_size, data_rank(), data_size(),
                                      with_cu_seqlens=d.with_cu_seqlens, verifier=verifier, **options)

    def train(self) -> RunSummary:
        """Step until training.train_steps, evaluating, logging and saving on the way."""
        t, state = self.cfg.training, self.state
        if state.step == 0:
            self.evaluate()
        while state.step < t.train_steps:
            started = time.perf_counter()
            loss, lr, grad_norm = self.train_step()
            state.consumed_samples += t.global_batch_size
            self.summary.train_losses[state.step] = loss
            self.metrics.step(state.step, loss, lr, grad_norm, time.perf_counter() - started)
            if every(state.step, self.cfg.logging.eval_interval, t.train_steps):
                self.evaluate()
            self.save_or_stop()
        self.summary.tokens_per_sec = self.metrics.tokens_per_sec()
        return self.summary

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro batches: the loss (their mean, and over the DP
        ranks), the learning rate it used and the gradient norm. A non-finite step was never applied:
        it is counted and logged, or stops the run (training.nonfinite)."""
        engine = self.engine
        lr = self.optimizer.param_groups[0]["lr"]
        micro_losses = []
        skipped_before = engine.skipped_steps
        for _ in range(self.grad_accum):
            loss = forward(engine, next(self.batches))
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.detach().float())
        loss = dp_mean(torch.stack(micro_losses).mean(), self.mpu)
        grad_norm = float(engine.get_global_grad_norm())
        self.state.step += 1
        self.watchdog.beat(f"step {self.state.step}")
        skip_line = self.nonfinite.check(self.state.step, loss, grad_norm, engine.skipped_steps > skipped_before)
        if skip_line:
            self.progress(skip_line)
            self.metrics.skipped(self.state.step, self.nonfinite.skipped)
        return loss, lr, grad_norm

    def evaluate(self) -> None:
        if (val_loss := self.evaluator()) is not None:
            self.summary.val_losses[self.state.step] = val_loss
            self.metrics.validation(self.state.step, val_loss)

    def save_or_stop(self) -> None:
        """Save when due. On a stop request (agreed on by all ranks) before the last step: save and
        raise RunStopped, for the job to be run again with --resume."""
        step = self.state.step
        stopping = self.stop.requested(self.engine.device) and step < self.cfg.training.train_steps
        if stopping:
            self.progress(f"{self.metrics.at(step)} | stop requested ({self.stop.reason()}): saving")
        if stopping or self.checkpoints.due(step):
            self.summary.checkpoint = str(self.checkpoints.save(self.state))
        if stopping:
            raise preemption.RunStopped(
                f"stopped by {self.stop.reason()} after step {step}, saved in {self.summary.checkpoint}; "
                f"exit code {preemption.REQUEUE_EXIT}: run again with --resume to continue",
                preemption.REQUEUE_EXIT)

    def close(self) -> None:
        """The end of the run, at train_steps or earlier, whatever was built by then (all ranks together)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.metrics is not None:
            self.metrics.close()
        destroy_parallel()


class Metrics:
    """Rank 0's account of a run: every step's loss, learning rate and gradient norm, skipped steps
    and validation losses in the record (MetricsLog); every logging.log_interval steps and at the
    last, a line with the throughput since the previous one, MFU and, on CUDA, peak memory."""

    def __init__(self, cfg: RunConfig, progress: Callable[[str], None], rank0: bool):
        self.folder = cfg.logging.tensorboard_dir if rank0 else None
        self.progress = progress
        self.log_interval, self.last_step = cfg.logging.log_interval, cfg.training.train_steps
        self.tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_length
        self.flops, self.peak = step_flops(cfg.model, cfg.data.seq_length), peak_flops()
        self.record: MetricsLog | None = None
        self.interval_time, self.interval_steps = 0.0, 0  # since the last log line
        self.timed_time, self.timed_steps, self.first_step = 0.0, 0, 0  # over the run, see `start`

    def flops_line(self) -> str:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU"
        return (f"model FLOPs: {self.flops.total:.4g} a token, forward and backward (6N: {self.flops.six_n:.4g}) | "
                + (f"MFU against {self.peak / 1e12:g} TFLOP/s per device" if self.peak is not None
                   else f"no MFU: the peak FLOP/s of {device_name} is unknown (set {PEAK_FLOPS_ENV})"))

    def start(self, step: int, num_parameters: int) -> None:
        """Open the record at the run's first step (rank 0) with the model's size. Throughput counts
        this process's steps after its first, which pays for allocations and warm-up."""
        if self.folder is not None:
            self.record = MetricsLog(self.folder)
        self._record({"step": step, "num_parameters": num_parameters})
        self.first_step = step + 1

    def at(self, step: int) -> str:
        """The step as log lines name it."""
        return f"step {step:>{len(str(self.last_step))}}/{self.last_step}"

    def skipped(self, step: int, skipped_steps: int) -> None:
        self._record({"step": step, "skipped_steps": skipped_steps})

    def step(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
        self.interval_time += seconds
        self.interval_steps += 1
        if step > self.first_step:
            self.timed_steps, self.timed_time = self.timed_steps + 1, self.timed_time + seconds
        self._record({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        if every(step, self.log_interval, self.last_step):
            line = self._throughput(step)
            self.progress(f"{self.at(step)} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | {line}")

    def _throughput(self, step: int) -> str:
        """Record the throughput, MFU and peak memory since the last log line; their part of the line."""
        tokens_per_sec = self.interval_steps * self.tokens_per_step / self.interval_time
        self.interval_time, self.interval_steps = 0.0, 0
        throughput = {"step": step, "tokens_per_sec": tokens_per_sec}
        line = f"{tokens_per_sec:,.0f} tokens/s"
        if self.peak is not None:
            throughput["mfu"] = mfu(self.flops.total, tokens_per_sec, dist.get_world_size(), self.peak)
            line += f" | MFU {100 * throughput['mfu']:.1f}%"
        if torch.cuda.is_available():  # this rank's peak since the last log line
            throughput["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
            line += f" | peak memory {throughput['peak_memory_gb']:.1f} GB"
        self._record(throughput)
        return line

    def validation(self, step: int, val_loss: float) -> None:
        self._record({"step": step, "val_loss": val_loss})
        self.progress(f"{self.at(step)} | val loss {val_loss:.4f}")

    def tokens_per_sec(self) -> float:
        """Over this process's timed steps (0 if it timed none)."""
        return self.timed_steps * self.tokens_per_step / self.timed_time if self.timed_time else 0.0

    def _record(self, values: dict) -> None:
        if self.record is not None:
            self.record.record(values)

    def close(self) -> None:
        if self.record is not None:
            self.record.close()


class Checkpoints:
    """When a run saves (every checkpoint.save_interval steps and at the last; the loop adds a stop)
    and the saving, never of non-finite weights; the log says how long each save took."""

    def __init__(self, cfg: RunConfig, engine, model: torch.nn.Module, watchdog: preemption.Watchdog,
                 progress: Callable[[str], None], lock: RunLock | None, estimated_bytes: int):
        """`lock`: rank 0's hold on the folder (None elsewhere); `estimated_bytes`: what the first
        save will take (disk_space.state_bytes)."""
        self.cfg, self.engine, self.model = cfg, engine, model
        self.watchdog, self.progress, self.lock = watchdog, progress, lock
        self.folder = Path(cfg.checkpoint.dir)
        self.estimated_bytes = estimated_bytes

    def due(self, step: int) -> bool:
        return every(step, self.cfg.checkpoint.save_interval, self.cfg.training.train_steps)

    def save(self, state: checkpoint.TrainState) -> Path:
        """A checkpoint of this step; RunStopped (and none written) if the weights are not finite."""
        self.watchdog.beat("the step before a save")
        if not preemption.weights_finite(self.model, self.engine.device):
            good = checkpoint.committed(self.folder)
            raise preemption.RunStopped(
                f"step {state.step}: the weights are not finite, no checkpoint written "
                f"(the last good one: {good[-1] if good else 'none'})", preemption.NONFINITE_EXIT)
        if self.lock is not None:
            self.lock.check()
        disk_space.require_room(self.folder, self.estimated_bytes)
        started = time.perf_counter()
        with disk_space.removed_if_refused(self.folder, state.step, self.estimated_bytes):
            path = checkpoint.save(self.engine, self.folder, state, to_dict(self.cfg), self.cfg.checkpoint.keep_last)
        self.progress(f"saved checkpoint {path} in {time.perf_counter() - started:.2f} s")
        self.watchdog.beat("a save")
        return path
